//! The shared store: files, batches and lines in Redis under `key_prefix`, so that every replica
//! serves the same batches and works the same lines.
//!
//! Lines to run are entries of one Redis Stream per batch, read with the consumer group `w`
//! (consumer = this process's id): an entry read is a lease, a settled line is acknowledged in
//! the same script that records its result, and entries a consumer has held longer than
//! `claim_after` (its replica died, or lost Redis) are taken over with XAUTOCLAIM. A retry waits
//! in a sorted set by due time and goes back on the stream once due. Every change of several keys
//! is one Lua script, so a replica killed at any point leaves no half-made change.
//!
//! Key layout under `<key_prefix>batch:`: `seq` (creation order), `f:<id>` (a file's metadata),
//! `fu:<id>` / `fc:<id>` (content being uploaded / closed, a list of chunks), `fo:<owner>` and
//! `fa` (files by owner and by age), `b:<id>` (a batch), `bo:<owner>`, `bs:<status>`, `be`
//! (batches by owner, status and end), `l:<id>:<part>` (a batch's lines).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{Cmd, FromRedisValue, Script};

use super::{
    BatchStore, Cancel, ContentReader, ContentWriter, Finish, Lease, LeasedLine, LineRecord,
    NewLine, Progress, Settlement, Stats, StoreError, StoreFuture, StoredBatch, StoredFile,
    Transition,
};
use crate::batch::model::{Batch, BatchStatus, FileObject, ListQuery};
use crate::redis::Redis;

mod batches;
mod content;
mod files;
mod lines;
mod scripts;

/// The `op` label of this store's failed Redis calls.
const OP: &str = crate::redis::op::BATCH;

/// Files and batches in Redis, lines shared over every replica. See the module documentation.
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    redis: Redis,
    base: String,
    consumer: String,
    claim_after: Duration,
    guarded: Script,
    claim_validation: Script,
    lease: Script,
    settle: Script,
    /// The token of each line this process holds, by batch and line: a settle with another
    /// token (the line was claimed by another replica meanwhile) changes nothing.
    held: Mutex<HashMap<(String, u64), String>>,
}

impl RedisStore {
    /// A store on `redis` (which may be down: calls then fail as unavailable until it is back).
    /// `claim_after` is how long a line may be held before another consumer takes it.
    pub fn new(redis: Redis, claim_after: Duration) -> RedisStore {
        let base = format!("{}batch:", redis.settings().key_prefix);
        let consumer = format!("{}-{}", std::process::id(), crate::batch::model::new_id(""));
        RedisStore {
            shared: Arc::new(Shared {
                redis,
                base,
                consumer,
                claim_after,
                guarded: Script::new(scripts::GUARDED),
                claim_validation: Script::new(scripts::CLAIM_VALIDATION),
                lease: Script::new(scripts::LEASE),
                settle: Script::new(scripts::SETTLE),
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// This process's consumer name in the line streams' group.
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    fn run<'a, T, F, Fut>(&self, work: F) -> StoreFuture<'a, T>
    where
        T: Send + 'a,
        F: FnOnce(Arc<Shared>) -> Fut + Send + 'a,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'a,
    {
        let shared = self.shared.clone();
        Box::pin(async move { work(shared).await })
    }
}

/// A file or batch id as the store accepts it: ours are `file-<hex>` and `batch_<hex>`; anything
/// else (read from a URL) names nothing.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An owner as a key part: hex, never raw caller text.
fn owner_key(owner: &str) -> String {
    owner.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Commands for [`scripts::GUARDED`], run together or not at all.
#[derive(Default)]
struct Ops(Vec<Vec<u8>>);

impl Ops {
    fn op(&mut self, parts: &[&[u8]]) -> &mut Self {
        self.0.push(parts.len().to_string().into_bytes());
        self.0.extend(parts.iter().map(|part| part.to_vec()));
        self
    }
}

impl Shared {
    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.base)
    }

    /// One command, bounded by `op_timeout`; unavailable when Redis is down or failed.
    async fn query<T: FromRedisValue + Send>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.redis
            .call(OP, |mut connection: ConnectionManager| async move {
                cmd.query_async::<T>(&mut connection).await
            })
            .await
            .ok_or_else(StoreError::unavailable)
    }

    /// Where a listing resumes: the position of `after` in the ordered set `index` (`None` from
    /// the start, or when `after` is not in it).
    async fn cursor(&self, index: &str, after: Option<&String>) -> Result<Option<f64>, StoreError> {
        match after {
            Some(after) => self.query(&Cmd::zscore(index, after)).await,
            None => Ok(None),
        }
    }

    async fn script<T: FromRedisValue + Send>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg.as_slice());
        }
        let invocation = &invocation;
        self.redis
            .call(OP, |mut connection: ConnectionManager| async move {
                invocation.invoke_async::<T>(&mut connection).await
            })
            .await
            .ok_or_else(StoreError::unavailable)
    }

    /// Runs `ops` if `field` of the hash `key` is `value` (always when `field` is empty).
    async fn guarded(
        &self,
        key: &str,
        field: &str,
        value: &str,
        ops: Ops,
    ) -> Result<bool, StoreError> {
        let mut args = vec![field.as_bytes().to_vec(), value.as_bytes().to_vec()];
        args.extend(ops.0);
        let ran: i64 = self.script(&self.guarded, &[key.to_owned()], &args).await?;
        Ok(ran == 1)
    }

    async fn next_seq(&self) -> Result<u64, StoreError> {
        self.query(&Cmd::incr(self.key("seq"), 1)).await
    }

    fn hold(&self, batch_id: &str, line: u64, token: &str) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.insert((batch_id.to_owned(), line), token.to_owned());
    }

    fn release(&self, batch_id: &str, line: u64) -> Option<String> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.remove(&(batch_id.to_owned(), line))
    }
}

impl BatchStore for RedisStore {
    fn create_content(&self, file_id: &str) -> StoreFuture<'_, Box<dyn ContentWriter>> {
        let id = file_id.to_owned();
        self.run(move |shared| async move { content::create(shared, &id) })
    }

    fn insert_file(&self, file: StoredFile) -> StoreFuture<'_, ()> {
        self.run(move |shared| async move { files::insert(&shared, &file).await })
    }

    fn file(&self, owner: &str, id: &str) -> StoreFuture<'_, Option<StoredFile>> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |shared| async move { files::get(&shared, &owner, &id).await })
    }

    fn list_files(&self, owner: &str, query: ListQuery) -> StoreFuture<'_, Vec<FileObject>> {
        let owner = owner.to_owned();
        self.run(move |shared| async move { files::list(&shared, &owner, &query).await })
    }

    fn read_content(&self, id: &str) -> StoreFuture<'_, Option<ContentReader>> {
        let id = id.to_owned();
        self.run(move |shared| async move { content::read(shared, &id).await })
    }

    fn delete_file(&self, owner: &str, id: &str) -> StoreFuture<'_, bool> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |shared| async move { files::delete(&shared, &owner, &id).await })
    }

    fn insert_batch(&self, owner: &str, batch: Batch) -> StoreFuture<'_, ()> {
        let owner = owner.to_owned();
        self.run(move |shared| async move { batches::insert(&shared, &owner, &batch).await })
    }

    fn batch(&self, owner: &str, id: &str) -> StoreFuture<'_, Option<Batch>> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |shared| async move {
            let stored = batches::get(&shared, Some(&owner), &id).await?;
            Ok(stored.map(|stored| stored.batch))
        })
    }

    fn list_batches(&self, owner: &str, query: ListQuery) -> StoreFuture<'_, Vec<Batch>> {
        let owner = owner.to_owned();
        self.run(move |shared| async move { batches::list(&shared, &owner, &query).await })
    }

    /// For `validating`, only the batches this replica may validate now: each is validated by
    /// one replica at a time, and taken over when its validator stopped for `claim_after`.
    fn batches_in(&self, status: BatchStatus) -> StoreFuture<'_, Vec<StoredBatch>> {
        self.run(move |shared| async move { batches::in_status(&shared, status).await })
    }

    fn clear_lines(&self, batch_id: &str) -> StoreFuture<'_, ()> {
        let batch_id = batch_id.to_owned();
        self.run(move |shared| async move { lines::clear(&shared, &batch_id).await })
    }

    fn add_lines(&self, batch_id: &str, new: Vec<NewLine>) -> StoreFuture<'_, ()> {
        let batch_id = batch_id.to_owned();
        self.run(move |shared| async move { lines::add(&shared, &batch_id, &new).await })
    }

    fn transition(&self, batch_id: &str, change: Transition) -> StoreFuture<'_, Option<Batch>> {
        let batch_id = batch_id.to_owned();
        self.run(move |shared| async move { batches::transition(&shared, &batch_id, change).await })
    }

    fn cancel(&self, owner: &str, id: &str, at: u64) -> StoreFuture<'_, Cancel> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |shared| async move { batches::cancel(&shared, &owner, &id, at).await })
    }

    fn running(&self, now_secs: u64) -> StoreFuture<'_, Vec<Progress>> {
        self.run(move |shared| async move { batches::running(&shared, now_secs).await })
    }

    fn active(&self) -> StoreFuture<'_, Vec<Progress>> {
        self.run(move |shared| async move { batches::active(&shared).await })
    }

    fn lease(&self, batch_id: &str, lease: Lease) -> StoreFuture<'_, Vec<LeasedLine>> {
        let batch_id = batch_id.to_owned();
        self.run(move |shared| async move { lines::lease(&shared, &batch_id, lease).await })
    }

    fn settle(&self, batch_id: &str, line: u64, settlement: Settlement) -> StoreFuture<'_, bool> {
        let batch_id = batch_id.to_owned();
        self.run(
            move |shared| async move { lines::settle(&shared, &batch_id, line, &settlement).await },
        )
    }

    fn next_due(&self, now_ms: u64) -> StoreFuture<'_, Option<u64>> {
        self.run(move |shared| async move { lines::next_due(&shared, now_ms).await })
    }

    fn lines(&self, batch_id: &str, after: u64, limit: usize) -> StoreFuture<'_, Vec<LineRecord>> {
        let batch_id = batch_id.to_owned();
        self.run(move |shared| async move { lines::page(&shared, &batch_id, after, limit).await })
    }

    fn finish(&self, batch_id: &str, finish: Finish) -> StoreFuture<'_, Option<Batch>> {
        let batch_id = batch_id.to_owned();
        self.run(move |shared| async move { batches::finish(&shared, &batch_id, finish).await })
    }

    fn sweep(&self, files_before: u64, batches_before: u64) -> StoreFuture<'_, u64> {
        self.run(move |shared| async move {
            let files = files::sweep(&shared, files_before).await?;
            Ok(files + batches::sweep(&shared, batches_before).await?)
        })
    }

    fn stats(&self) -> StoreFuture<'_, Stats> {
        self.run(move |shared| async move { batches::stats(&shared).await })
    }

    /// Nothing to release: lines this process still holds are claimed by another replica after
    /// `claim_after` (or by this one when it comes back, under a new consumer name).
    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
