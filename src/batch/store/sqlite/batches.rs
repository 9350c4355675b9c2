//! The `batches` table: each batch's OpenAI object, with its status, counts and times beside it
//! as columns for the queries that workers, finalization and retention make.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::files;
use crate::batch::model::{Batch, BatchErrors, BatchStatus, ListQuery, RequestCounts};
use crate::batch::store::{Cancel, Finish, Progress, Stats, StoreError, StoredBatch, Transition};

const COLUMNS: &str = "owner, object, total, completed, failed";

/// A row as read: the stored object with the live counts put in.
fn stored(row: &Row<'_>) -> rusqlite::Result<(String, String, RequestCounts)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        RequestCounts {
            total: row.get(2)?,
            completed: row.get(3)?,
            failed: row.get(4)?,
        },
    ))
}

fn decode(
    (owner, object, counts): (String, String, RequestCounts),
) -> Result<StoredBatch, StoreError> {
    let mut batch: Batch = serde_json::from_str(&object)?;
    batch.request_counts = counts;
    Ok(StoredBatch { owner, batch })
}

pub(super) fn insert(conn: &mut Connection, owner: &str, batch: &Batch) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO batches (id, owner, endpoint, status, expires_at, object)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            batch.id,
            owner,
            batch.endpoint,
            batch.status.as_str(),
            batch.expires_at.unwrap_or(u64::MAX >> 1),
            serde_json::to_string(batch)?,
        ],
    )?;
    Ok(())
}

/// The batch `id`, of `owner` when one is given.
pub(super) fn get(
    conn: &Connection,
    owner: Option<&str>,
    id: &str,
) -> Result<Option<StoredBatch>, StoreError> {
    let row = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM batches WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)"),
            params![id, owner],
            stored,
        )
        .optional()?;
    row.map(decode).transpose()
}

/// Writes a batch's object and status back (the counts are columns of their own).
fn save(tx: &Transaction<'_>, batch: &Batch) -> Result<(), StoreError> {
    let ended_at = if batch.status.is_final() {
        [
            batch.completed_at,
            batch.failed_at,
            batch.expired_at,
            batch.cancelled_at,
        ]
        .into_iter()
        .flatten()
        .max()
    } else {
        None
    };
    tx.execute(
        "UPDATE batches SET status = ?2, ended_at = ?3, object = ?4 WHERE id = ?1",
        params![
            batch.id,
            batch.status.as_str(),
            ended_at,
            serde_json::to_string(batch)?
        ],
    )?;
    Ok(())
}

pub(super) fn list(
    conn: &mut Connection,
    owner: &str,
    query: &ListQuery,
) -> Result<Vec<Batch>, StoreError> {
    let after = super::cursor(conn, "batches", owner, query.after.as_deref())?;
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM batches WHERE owner = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
    ))?;
    let rows = statement.query_map(
        params![
            owner,
            after.unwrap_or(i64::MAX),
            query.limit.saturating_add(1)
        ],
        stored,
    )?;
    rows.map(|row| Ok(decode(row?)?.batch)).collect()
}

pub(super) fn in_status(
    conn: &mut Connection,
    status: BatchStatus,
) -> Result<Vec<StoredBatch>, StoreError> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM batches WHERE status = ?1 ORDER BY seq"
    ))?;
    let rows = statement.query_map([status.as_str()], stored)?;
    rows.map(|row| decode(row?)).collect()
}

/// Changes the batch `id` if it is in status `from`, in one transaction: `change` edits the
/// object and the rows beside it, then the object is saved. `None` when the batch was not in
/// `from`.
fn update(
    conn: &mut Connection,
    id: &str,
    from: BatchStatus,
    change: impl FnOnce(&Transaction<'_>, &mut Batch) -> Result<(), StoreError>,
) -> Result<Option<Batch>, StoreError> {
    let tx = conn.transaction()?;
    let current = get(&tx, None, id)?.map(|stored| stored.batch);
    let Some(mut batch) = current.filter(|batch| batch.status == from) else {
        return Ok(None);
    };
    change(&tx, &mut batch)?;
    save(&tx, &batch)?;
    tx.commit()?;
    Ok(Some(batch))
}

pub(super) fn transition(
    conn: &mut Connection,
    id: &str,
    change: Transition,
) -> Result<Option<Batch>, StoreError> {
    update(conn, id, change.from, |tx, batch| {
        if change.to == BatchStatus::InProgress {
            let total: u64 = tx.query_row(
                "SELECT count(*) FROM lines WHERE batch_id = ?1",
                [id],
                |row| row.get(0),
            )?;
            tx.execute(
                "UPDATE batches SET total = ?2 WHERE id = ?1",
                params![id, total],
            )?;
            batch.request_counts.total = total;
        }
        batch.enter(change.to, change.at);
        Ok(())
    })
}

pub(super) fn cancel(
    conn: &mut Connection,
    owner: &str,
    id: &str,
    at: u64,
) -> Result<Cancel, StoreError> {
    let tx = conn.transaction()?;
    let Some(StoredBatch { mut batch, .. }) = get(&tx, Some(owner), id)? else {
        return Ok(Cancel::NotFound);
    };
    let answer = match batch.status {
        BatchStatus::Validating | BatchStatus::InProgress => {
            batch.enter(BatchStatus::Cancelling, at);
            save(&tx, &batch)?;
            Cancel::Accepted(batch)
        }
        BatchStatus::Cancelling | BatchStatus::Cancelled => Cancel::Accepted(batch),
        _ => Cancel::Finished(batch),
    };
    tx.commit()?;
    Ok(answer)
}

fn progress(row: &Row<'_>) -> rusqlite::Result<Progress> {
    let status: String = row.get(3)?;
    let (total, done): (u64, u64) = (row.get(5)?, row.get(6)?);
    Ok(Progress {
        id: row.get(0)?,
        owner: row.get(1)?,
        endpoint: row.get(2)?,
        // Only this module writes the column, always from `BatchStatus::as_str`.
        status: BatchStatus::parse(&status).unwrap_or(BatchStatus::Failed),
        expires_at: row.get(4)?,
        settled: done >= total,
        leased: row.get(7)?,
    })
}

const COUNT_LEASED: &str =
    "(SELECT count(*) FROM lines l WHERE l.batch_id = b.id AND l.state = 'leased')";

/// The progress of the batches that pass `filter`; `leased` is how their leased lines are
/// counted.
fn progress_query(leased: &str, filter: &str) -> String {
    format!(
        "SELECT b.id, b.owner, b.endpoint, b.status, b.expires_at, b.total,
         b.completed + b.failed, {leased} FROM batches b {filter} ORDER BY b.seq"
    )
}

pub(super) fn running(conn: &mut Connection, now_secs: u64) -> Result<Vec<Progress>, StoreError> {
    // Workers ask before every lease; they need no count of leases.
    let sql = progress_query("0", "WHERE b.status = 'in_progress' AND b.expires_at > ?1");
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map([now_secs], progress)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn active(conn: &mut Connection) -> Result<Vec<Progress>, StoreError> {
    let sql = progress_query(
        COUNT_LEASED,
        "WHERE b.status IN ('in_progress', 'finalizing', 'cancelling')",
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map([], progress)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn finish(
    conn: &mut Connection,
    id: &str,
    finish: Finish,
) -> Result<Option<Batch>, StoreError> {
    update(conn, id, finish.from, |tx, batch| {
        for file in finish.output.iter().chain(&finish.error) {
            files::insert(tx, file)?;
        }
        batch.output_file_id = finish.output.map(|file| file.object.id);
        batch.error_file_id = finish.error.map(|file| file.object.id);
        batch.errors = finish.errors.map(|data| BatchErrors {
            object: "list".to_owned(),
            data,
        });
        batch.enter(finish.status, finish.at);
        // A batch cancelled while it was validated never had its total fixed: every line it
        // stored is then counted here.
        let counts = &mut batch.request_counts;
        counts.failed += finish.unfinished;
        counts.total = counts.total.max(counts.completed + counts.failed);
        tx.execute(
            "UPDATE batches SET failed = ?2, total = ?3 WHERE id = ?1",
            params![id, counts.failed, counts.total],
        )?;
        tx.execute("DELETE FROM lines WHERE batch_id = ?1", [id])?;
        Ok(())
    })
}

/// Removes batches that ended before `before` (Unix seconds), with any lines left.
pub(super) fn sweep(conn: &mut Connection, before: u64) -> Result<u64, StoreError> {
    let tx = conn.transaction()?;
    tx.execute(
        "DELETE FROM lines WHERE batch_id IN (SELECT id FROM batches WHERE ended_at < ?1)",
        [before],
    )?;
    let removed = tx.execute("DELETE FROM batches WHERE ended_at < ?1", [before])?;
    tx.commit()?;
    Ok(removed as u64)
}

pub(super) fn stats(conn: &mut Connection) -> Result<Stats, StoreError> {
    // The counters say it without reading a line.
    let queue_depth = conn.query_row(
        "SELECT coalesce(sum(total - completed - failed), 0) FROM batches
         WHERE status IN ('in_progress', 'finalizing', 'cancelling')",
        [],
        |row| row.get(0),
    )?;
    let mut statement =
        conn.prepare_cached("SELECT status, count(*) FROM batches GROUP BY status")?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, u64>(1)?))
    })?;
    let mut batches = Vec::new();
    for row in rows {
        let (status, count) = row?;
        if let Some(status) = BatchStatus::parse(&status) {
            batches.push((status, count));
        }
    }
    Ok(Stats {
        queue_depth,
        batches,
    })
}
