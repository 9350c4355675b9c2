//! The embedded store: one SQLite database (WAL) for files' metadata, batches and lines, and the
//! files' contents as plain files beside it, all in the `[batch] store` directory.
//!
//! SQLite in WAL mode with `synchronous = NORMAL` makes every committed transaction survive the
//! process being killed (the commit is in the WAL before the call returns) without an fsync per
//! line; only a power loss can take the last commits back. The database is opened in exclusive
//! locking mode: one process owns the store, so the leases found at start-up belong to a process
//! that died, and their lines go back to `pending`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use tokio::io::AsyncWriteExt;

use super::{
    BatchStore, Cancel, ContentReader, ContentWriter, Finish, Lease, LeasedLine, LineRecord,
    NewLine, Progress, Settlement, Stats, StoreError, StoreFuture, StoredBatch, StoredFile,
    Transition,
};
use crate::batch::model::{Batch, BatchStatus, FileObject, ListQuery};

mod batches;
mod files;
mod lines;

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError(format!("batch store database: {error}"))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(error: serde_json::Error) -> Self {
        StoreError(format!("batch store record: {error}"))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    object TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files(owner, seq);
CREATE INDEX IF NOT EXISTS files_by_age ON files(created_at);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    object TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches(owner, seq);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches(status, seq);
CREATE INDEX IF NOT EXISTS batches_by_end ON batches(ended_at);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    due_ms INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX IF NOT EXISTS lines_by_state ON lines(batch_id, state, due_ms, line);
";

/// The embedded store on a directory. See the module documentation for its guarantees.
pub struct SqliteStore {
    db: Arc<Mutex<Option<Connection>>>,
    contents: PathBuf,
}

impl SqliteStore {
    /// Opens (creating it if needed) the store in `dir`: lines that a dead process held go back
    /// to `pending`, contents that no file lists (an upload or a finalization cut short) are
    /// removed. Fails when another process has the store open.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        let contents = dir.join("files");
        std::fs::create_dir_all(&contents)?;
        let conn = Connection::open(dir.join("batches.sqlite3"))?;
        // A store that is still being released (a restart in the same process) gets a moment.
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA).map_err(|error| {
            StoreError(format!(
                "cannot open the batch store in {} (is another process using it?): {error}",
                dir.display()
            ))
        })?;
        lines::release_leases(&conn)?;
        files::remove_orphans(&conn, &contents)?;
        Ok(SqliteStore {
            db: Arc::new(Mutex::new(Some(conn))),
            contents,
        })
    }

    /// Runs `work` on the database on the blocking pool.
    fn run<T, F>(&self, work: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut guard = db.lock().unwrap_or_else(PoisonError::into_inner);
                let conn = guard
                    .as_mut()
                    .ok_or_else(|| StoreError("the batch store is closed".to_owned()))?;
                work(conn)
            })
            .await
            .map_err(|error| StoreError(format!("batch store task failed: {error}")))?
        })
    }

    fn content_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        files::content_path(&self.contents, id)
    }
}

/// Where a list resumes: the position of the object `after` of `owner` in `table`, in creation
/// order. An unknown `after` starts from the beginning.
fn cursor(
    conn: &Connection,
    table: &str,
    owner: &str,
    after: Option<&str>,
) -> Result<Option<i64>, StoreError> {
    let Some(after) = after else {
        return Ok(None);
    };
    let sql = format!("SELECT seq FROM {table} WHERE id = ?1 AND owner = ?2");
    Ok(conn
        .query_row(&sql, rusqlite::params![after, owner], |row| row.get(0))
        .optional()?)
}

/// A content file being written as `<id>.part`, renamed to `<id>` when closed.
struct PartFile {
    file: Option<tokio::fs::File>,
    part: PathBuf,
    done: PathBuf,
    closed: bool,
}

impl ContentWriter for PartFile {
    fn write<'a>(&'a mut self, chunk: &'a [u8]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let file = self
                .file
                .as_mut()
                .ok_or_else(|| StoreError("content already closed".to_owned()))?;
            file.write_all(chunk).await?;
            Ok(())
        })
    }

    fn close(mut self: Box<Self>) -> StoreFuture<'static, ()> {
        Box::pin(async move {
            if let Some(mut file) = self.file.take() {
                file.flush().await?;
                file.sync_all().await?;
            }
            tokio::fs::rename(&self.part, &self.done).await?;
            self.closed = true;
            Ok(())
        })
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.closed {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

impl BatchStore for SqliteStore {
    fn create_content(&self, file_id: &str) -> StoreFuture<'_, Box<dyn ContentWriter>> {
        let done = self.content_path(file_id);
        Box::pin(async move {
            let done = done?;
            let part = done.with_extension("part");
            let file = tokio::fs::File::create(&part).await?;
            let writer: Box<dyn ContentWriter> = Box::new(PartFile {
                file: Some(file),
                part,
                done,
                closed: false,
            });
            Ok(writer)
        })
    }

    fn insert_file(&self, file: StoredFile) -> StoreFuture<'_, ()> {
        self.run(move |conn| files::insert(conn, &file))
    }

    fn file(&self, owner: &str, id: &str) -> StoreFuture<'_, Option<StoredFile>> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |conn| files::get(conn, &owner, &id))
    }

    fn list_files(&self, owner: &str, query: ListQuery) -> StoreFuture<'_, Vec<FileObject>> {
        let owner = owner.to_owned();
        self.run(move |conn| files::list(conn, &owner, &query))
    }

    fn read_content(&self, id: &str) -> StoreFuture<'_, Option<ContentReader>> {
        let path = self.content_path(id);
        Box::pin(async move {
            match tokio::fs::File::open(path?).await {
                Ok(file) => Ok(Some(Box::pin(file) as ContentReader)),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error.into()),
            }
        })
    }

    fn delete_file(&self, owner: &str, id: &str) -> StoreFuture<'_, bool> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        let contents = self.contents.clone();
        self.run(move |conn| files::delete(conn, &contents, &owner, &id))
    }

    fn insert_batch(&self, owner: &str, batch: Batch) -> StoreFuture<'_, ()> {
        let owner = owner.to_owned();
        self.run(move |conn| batches::insert(conn, &owner, &batch))
    }

    fn batch(&self, owner: &str, id: &str) -> StoreFuture<'_, Option<Batch>> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |conn| batches::get(conn, Some(&owner), &id).map(|b| b.map(|b| b.batch)))
    }

    fn list_batches(&self, owner: &str, query: ListQuery) -> StoreFuture<'_, Vec<Batch>> {
        let owner = owner.to_owned();
        self.run(move |conn| batches::list(conn, &owner, &query))
    }

    fn batches_in(&self, status: BatchStatus) -> StoreFuture<'_, Vec<StoredBatch>> {
        self.run(move |conn| batches::in_status(conn, status))
    }

    fn clear_lines(&self, batch_id: &str) -> StoreFuture<'_, ()> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| lines::clear(conn, &batch_id))
    }

    fn add_lines(&self, batch_id: &str, new: Vec<NewLine>) -> StoreFuture<'_, ()> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| lines::add(conn, &batch_id, &new))
    }

    fn transition(&self, batch_id: &str, change: Transition) -> StoreFuture<'_, Option<Batch>> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| batches::transition(conn, &batch_id, change))
    }

    fn cancel(&self, owner: &str, id: &str, at: u64) -> StoreFuture<'_, Cancel> {
        let (owner, id) = (owner.to_owned(), id.to_owned());
        self.run(move |conn| batches::cancel(conn, &owner, &id, at))
    }

    fn running(&self, now_secs: u64) -> StoreFuture<'_, Vec<Progress>> {
        self.run(move |conn| batches::running(conn, now_secs))
    }

    fn active(&self) -> StoreFuture<'_, Vec<Progress>> {
        self.run(batches::active)
    }

    fn lease(&self, batch_id: &str, lease: Lease) -> StoreFuture<'_, Vec<LeasedLine>> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| lines::lease(conn, &batch_id, lease))
    }

    fn settle(&self, batch_id: &str, line: u64, settlement: Settlement) -> StoreFuture<'_, bool> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| lines::settle(conn, &batch_id, line, &settlement))
    }

    fn next_due(&self, now_ms: u64) -> StoreFuture<'_, Option<u64>> {
        self.run(move |conn| lines::next_due(conn, now_ms))
    }

    fn lines(&self, batch_id: &str, after: u64, limit: usize) -> StoreFuture<'_, Vec<LineRecord>> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| lines::page(conn, &batch_id, after, limit))
    }

    fn finish(&self, batch_id: &str, finish: Finish) -> StoreFuture<'_, Option<Batch>> {
        let batch_id = batch_id.to_owned();
        self.run(move |conn| batches::finish(conn, &batch_id, finish))
    }

    fn sweep(&self, files_before: u64, batches_before: u64) -> StoreFuture<'_, u64> {
        let contents = self.contents.clone();
        self.run(move |conn| {
            let files = files::sweep(conn, &contents, files_before)?;
            Ok(files + batches::sweep(conn, batches_before)?)
        })
    }

    fn stats(&self) -> StoreFuture<'_, Stats> {
        self.run(batches::stats)
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = db.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some(conn) = conn {
                    conn.close().map_err(|(_, error)| StoreError::from(error))?;
                }
                Ok(())
            })
            .await
            .map_err(|error| StoreError(format!("batch store task failed: {error}")))?
        })
    }
}
