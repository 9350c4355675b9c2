//! Where files, batches and their lines live, behind one trait: the embedded SQLite store of one
//! replica, or the Redis store that every replica shares (lines over a Streams consumer group).
//!
//! A line moves `pending -> leased(until) -> retry_at(t) -> ... -> succeeded | failed`, and each
//! move is one transaction together with its result: a result once settled is never run again,
//! and a line whose result was not settled is run again after a crash.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::io::AsyncRead;

use super::model::{Batch, BatchStatus, FileObject, LineError, ListQuery};

mod redis;
mod sqlite;

pub use self::redis::RedisStore;
pub use sqlite::SqliteStore;

/// The future every store call returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A file's content, read from the start.
pub type ContentReader = Pin<Box<dyn AsyncRead + Send + Sync>>;

/// A store call failed (I/O, a corrupt database, the store closed). The message never holds
/// file contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// What a store says while it cannot reach its database (Redis down): the API answers 503
    /// and the workers wait and try again.
    pub const UNAVAILABLE: &'static str =
        "the batch store is unavailable (Redis cannot be reached)";

    pub fn unavailable() -> StoreError {
        StoreError(StoreError::UNAVAILABLE.to_owned())
    }

    pub fn is_unavailable(&self) -> bool {
        self.0 == StoreError::UNAVAILABLE
    }
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> Self {
        StoreError(format!("batch store I/O: {error}"))
    }
}

/// A file's content being written as it arrives. Dropping it without [`ContentWriter::close`]
/// throws away what was written.
pub trait ContentWriter: Send {
    fn write<'a>(&'a mut self, chunk: &'a [u8]) -> StoreFuture<'a, ()>;
    /// Makes the content durable under its id. It is listed once a [`StoredFile`] names it.
    fn close(self: Box<Self>) -> StoreFuture<'static, ()>;
}

/// A file and what the store keeps beside OpenAI's object.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    pub owner: String,
    /// Lines in the content (counted while it arrived), checked against `max_lines`.
    pub lines: u64,
    pub object: FileObject,
}

/// A batch and its owner.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    pub owner: String,
    pub batch: Batch,
}

/// Where a line stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineState {
    Pending,
    Leased,
    RetryAt,
    Succeeded,
    Failed,
}

/// A validated input line, to be stored with its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLine {
    /// 1-based line number in the input file.
    pub line: u64,
    pub custom_id: String,
    pub body: Bytes,
}

/// Which lines a worker takes: at most `max` that are due at `now_ms`, held until `until_ms`
/// (Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub now_ms: u64,
    pub until_ms: u64,
    pub max: usize,
}

/// A line a worker now holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedLine {
    pub line: u64,
    pub custom_id: String,
    pub body: Bytes,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// A line as finalization reads it: its result once settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRecord {
    pub line: u64,
    pub custom_id: String,
    pub state: LineState,
    /// The output or error file line (JSONL, newline included) of a settled line.
    pub result: Option<Bytes>,
}

/// How a leased line ends its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Its line for the output file.
    Succeeded(Bytes),
    /// Its line for the error file.
    Failed(Bytes),
    /// Runs again once the clock reaches this time (Unix milliseconds).
    RetryAt(u64),
}

/// A batch that workers or finalization still have to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub id: String,
    pub owner: String,
    pub endpoint: String,
    pub status: BatchStatus,
    /// Unix seconds.
    pub expires_at: u64,
    /// Every line succeeded or failed.
    pub settled: bool,
    /// Lines held by workers now.
    pub leased: u64,
}

/// A batch's move from one status to the next, at `at` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BatchStatus,
    pub to: BatchStatus,
    pub at: u64,
}

/// How a batch ends: from which status, its final status, the files made for it (listed in the
/// same transaction), and for a batch that failed validation, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub from: BatchStatus,
    pub status: BatchStatus,
    /// Unix seconds.
    pub at: u64,
    pub output: Option<StoredFile>,
    pub error: Option<StoredFile>,
    pub errors: Option<Vec<LineError>>,
    /// Lines never run (cancelled or expired): counted as failed, as the error file lists them.
    pub unfinished: u64,
}

impl Finish {
    /// A batch whose input failed validation, for `errors`.
    pub fn invalid(at: u64, errors: Vec<LineError>) -> Finish {
        Finish {
            from: BatchStatus::Validating,
            status: BatchStatus::Failed,
            at,
            output: None,
            error: None,
            errors: Some(errors),
            unfinished: 0,
        }
    }
}

/// The answer to a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    NotFound,
    /// Now cancelling (or already cancelling or cancelled).
    Accepted(Batch),
    /// Already ended otherwise; cancelling it is a conflict.
    Finished(Batch),
}

/// Counts for the gauges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// Lines not yet settled, over every batch still running.
    pub queue_depth: u64,
    pub batches: Vec<(BatchStatus, u64)>,
}

/// The durable state of the Batch API. Every call that takes an `owner` answers as if objects
/// of other owners did not exist.
pub trait BatchStore: Send + Sync + 'static {
    /// Starts writing the content of a new file.
    fn create_content(&self, file_id: &str) -> StoreFuture<'_, Box<dyn ContentWriter>>;
    /// Lists a file whose content was closed.
    fn insert_file(&self, file: StoredFile) -> StoreFuture<'_, ()>;
    fn file(&self, owner: &str, id: &str) -> StoreFuture<'_, Option<StoredFile>>;
    /// Up to `query.limit + 1` files, so that the caller can tell whether more follow.
    fn list_files(&self, owner: &str, query: ListQuery) -> StoreFuture<'_, Vec<FileObject>>;
    /// The content of a listed file (ownership is checked with [`BatchStore::file`] first).
    fn read_content(&self, id: &str) -> StoreFuture<'_, Option<ContentReader>>;
    fn delete_file(&self, owner: &str, id: &str) -> StoreFuture<'_, bool>;

    fn insert_batch(&self, owner: &str, batch: Batch) -> StoreFuture<'_, ()>;
    fn batch(&self, owner: &str, id: &str) -> StoreFuture<'_, Option<Batch>>;
    /// Up to `query.limit + 1` batches, newest first.
    fn list_batches(&self, owner: &str, query: ListQuery) -> StoreFuture<'_, Vec<Batch>>;
    /// Batches in `status`, oldest first.
    fn batches_in(&self, status: BatchStatus) -> StoreFuture<'_, Vec<StoredBatch>>;

    /// Drops the lines stored for a batch (validation starting over after a crash).
    fn clear_lines(&self, batch_id: &str) -> StoreFuture<'_, ()>;
    /// Stores validated lines, `pending`.
    fn add_lines(&self, batch_id: &str, lines: Vec<NewLine>) -> StoreFuture<'_, ()>;
    /// Moves a batch as `change` says; entering `in_progress` fixes `request_counts.total` to
    /// the lines stored. `None` when the batch was not in `change.from`.
    fn transition(&self, batch_id: &str, change: Transition) -> StoreFuture<'_, Option<Batch>>;
    fn cancel(&self, owner: &str, id: &str, at: u64) -> StoreFuture<'_, Cancel>;

    /// Batches workers may take lines from: `in_progress` and not past `expires_at`.
    fn running(&self, now_secs: u64) -> StoreFuture<'_, Vec<Progress>>;
    /// Batches in `in_progress`, `finalizing` or `cancelling`, with their line counts.
    fn active(&self) -> StoreFuture<'_, Vec<Progress>>;
    /// Leases the batch's next lines that are due (due retries first, then pending lines in
    /// input order); none when none is due or the batch stopped running.
    fn lease(&self, batch_id: &str, lease: Lease) -> StoreFuture<'_, Vec<LeasedLine>>;
    /// Ends a lease, counting the attempt: in one transaction, the line's new state, its result
    /// and the batch's `request_counts`. `false` when the line was not leased (nothing changed).
    fn settle(&self, batch_id: &str, line: u64, settlement: Settlement) -> StoreFuture<'_, bool>;
    /// The earliest retry time (Unix milliseconds) of a line of a batch that is running at
    /// `now_ms`.
    fn next_due(&self, now_ms: u64) -> StoreFuture<'_, Option<u64>>;
    /// A batch's lines in input order, after line `after`, at most `limit`.
    fn lines(&self, batch_id: &str, after: u64, limit: usize) -> StoreFuture<'_, Vec<LineRecord>>;
    /// Ends a batch that is in `finish.from`: lists its files, sets its status, timestamps, file
    /// ids and counts, and drops its lines, in one transaction. `None` when it was not.
    fn finish(&self, batch_id: &str, finish: Finish) -> StoreFuture<'_, Option<Batch>>;

    /// Removes files created before `files_before` and batches that ended before
    /// `batches_before` (Unix seconds); returns how many objects went.
    fn sweep(&self, files_before: u64, batches_before: u64) -> StoreFuture<'_, u64>;
    fn stats(&self) -> StoreFuture<'_, Stats>;
    /// Releases the store (its database lock); later calls fail.
    fn close(&self) -> StoreFuture<'_, ()>;
}
