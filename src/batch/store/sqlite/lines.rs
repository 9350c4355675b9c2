//! The `lines` table: each input line's body, state, next due time, attempts and result.
//!
//! States: `pending` (due now, `due_ms` 0), `leased` (`due_ms` is the lease's end), `retry_at`
//! (`due_ms` is when it may run again), `succeeded` and `failed` (with their result).

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::batch::store::{
    Lease, LeasedLine, LineRecord, LineState, NewLine, Settlement, StoreError,
};

/// At start-up nothing runs yet: every lease belongs to a process that is gone.
pub(super) fn release_leases(conn: &Connection) -> Result<(), StoreError> {
    let released = conn.execute(
        "UPDATE lines SET state = 'pending', due_ms = 0 WHERE state = 'leased'",
        [],
    )?;
    if released > 0 {
        tracing::info!(
            lines = released,
            "batch lines held when the proxy stopped run again"
        );
    }
    Ok(())
}

pub(super) fn clear(conn: &mut Connection, batch_id: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM lines WHERE batch_id = ?1", [batch_id])?;
    Ok(())
}

pub(super) fn add(
    conn: &mut Connection,
    batch_id: &str,
    lines: &[NewLine],
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO lines (batch_id, line, custom_id, body, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
        )?;
        for line in lines {
            insert.execute(params![batch_id, line.line, line.custom_id, &line.body[..]])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Line numbers of a batch to lease next: due retries first (they have waited longest), then
/// pending lines in input order; at most `max`.
fn due_lines(
    tx: &Transaction<'_>,
    batch_id: &str,
    now_ms: u64,
    max: usize,
) -> Result<Vec<u64>, StoreError> {
    let mut lines = Vec::with_capacity(max);
    let queries = [
        "SELECT line FROM lines WHERE batch_id = ?1 AND state = 'retry_at' AND due_ms <= ?2
         ORDER BY due_ms LIMIT ?3",
        // ?2 is unused here; numbered parameters let both queries take the same three.
        "SELECT line FROM lines WHERE batch_id = ?1 AND state = 'pending' AND due_ms = 0
         ORDER BY line LIMIT ?3",
    ];
    for sql in queries {
        let wanted = max - lines.len();
        if wanted == 0 {
            break;
        }
        let mut statement = tx.prepare_cached(sql)?;
        let rows = statement.query_map(params![batch_id, now_ms, wanted], |row| row.get(0))?;
        for line in rows {
            lines.push(line?);
        }
    }
    Ok(lines)
}

pub(super) fn lease(
    conn: &mut Connection,
    batch_id: &str,
    lease: Lease,
) -> Result<Vec<LeasedLine>, StoreError> {
    let tx = conn.transaction()?;
    let running: Option<bool> = tx
        .query_row(
            "SELECT status = 'in_progress' AND expires_at * 1000 > ?2 FROM batches WHERE id = ?1",
            params![batch_id, lease.now_ms],
            |row| row.get(0),
        )
        .optional()?;
    if running != Some(true) {
        return Ok(Vec::new());
    }
    let lines = due_lines(&tx, batch_id, lease.now_ms, lease.max)?;
    let mut leased = Vec::with_capacity(lines.len());
    {
        let mut take = tx.prepare_cached(
            "UPDATE lines SET state = 'leased', due_ms = ?3 WHERE batch_id = ?1 AND line = ?2
             RETURNING custom_id, body, attempts",
        )?;
        for line in lines {
            leased.push(
                take.query_row(params![batch_id, line, lease.until_ms], |row| {
                    Ok(LeasedLine {
                        line,
                        custom_id: row.get(0)?,
                        body: row.get::<_, Vec<u8>>(1)?.into(),
                        attempts: row.get(2)?,
                    })
                })?,
            );
        }
    }
    tx.commit()?;
    Ok(leased)
}

pub(super) fn settle(
    conn: &mut Connection,
    batch_id: &str,
    line: u64,
    settlement: &Settlement,
) -> Result<bool, StoreError> {
    let (state, due_ms, result, counter) = match settlement {
        Settlement::Succeeded(result) => ("succeeded", 0, Some(&result[..]), Some("completed")),
        Settlement::Failed(result) => ("failed", 0, Some(&result[..]), Some("failed")),
        Settlement::RetryAt(at) => ("retry_at", *at, None, None),
    };
    let tx = conn.transaction()?;
    let changed = tx.execute(
        "UPDATE lines SET state = ?3, due_ms = ?4, result = ?5, attempts = attempts + 1
         WHERE batch_id = ?1 AND line = ?2 AND state = 'leased'",
        params![batch_id, line, state, due_ms, result],
    )?;
    if changed == 0 {
        return Ok(false);
    }
    if let Some(counter) = counter {
        tx.execute(
            &format!("UPDATE batches SET {counter} = {counter} + 1 WHERE id = ?1"),
            [batch_id],
        )?;
    }
    tx.commit()?;
    Ok(true)
}

pub(super) fn next_due(conn: &mut Connection, now_ms: u64) -> Result<Option<u64>, StoreError> {
    Ok(conn.query_row(
        "SELECT min(l.due_ms) FROM batches b JOIN lines l ON l.batch_id = b.id
         WHERE b.status = 'in_progress' AND b.expires_at * 1000 > ?1 AND l.state = 'retry_at'",
        [now_ms],
        |row| row.get(0),
    )?)
}

fn state(text: &str) -> LineState {
    match text {
        "pending" => LineState::Pending,
        "leased" => LineState::Leased,
        "retry_at" => LineState::RetryAt,
        "succeeded" => LineState::Succeeded,
        _ => LineState::Failed,
    }
}

pub(super) fn page(
    conn: &mut Connection,
    batch_id: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<LineRecord>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT line, custom_id, state, result FROM lines WHERE batch_id = ?1 AND line > ?2
         ORDER BY line LIMIT ?3",
    )?;
    let rows = statement.query_map(params![batch_id, after, limit], |row| {
        Ok(LineRecord {
            line: row.get(0)?,
            custom_id: row.get(1)?,
            state: state(&row.get::<_, String>(2)?),
            result: row.get::<_, Option<Vec<u8>>>(3)?.map(Into::into),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bytes::Bytes;

    use super::super::SqliteStore;
    use crate::batch::model::{new_id, Batch, BatchStatus};
    use crate::batch::store::{
        BatchStore, Cancel, Finish, Lease, LeasedLine, LineState, NewLine, Settlement, Transition,
    };

    /// A store on a fresh directory holding `batch_1` of `alice`, validating, with `lines`
    /// lines stored.
    async fn validating_store(name: &str, lines: u64) -> (PathBuf, SqliteStore) {
        let dir = std::env::temp_dir().join(format!("openrouter-proxy-{name}-{}", new_id("")));
        let store = SqliteStore::open(&dir).unwrap();
        let batch = Batch::new(
            "batch_1".into(),
            "/v1/embeddings".into(),
            "f".into(),
            1,
            1 << 40,
        );
        store.insert_batch("alice", batch).await.unwrap();
        let new = (1..=lines)
            .map(|line| NewLine {
                line,
                custom_id: format!("c{line}"),
                body: Bytes::from_static(b"{\"model\":\"m\"}"),
            })
            .collect();
        store.add_lines("batch_1", new).await.unwrap();
        (dir, store)
    }

    /// The same, started: `in_progress`.
    async fn running_store(name: &str, lines: u64) -> (PathBuf, SqliteStore) {
        let (dir, store) = validating_store(name, lines).await;
        let started = store
            .transition(
                "batch_1",
                Transition {
                    from: BatchStatus::Validating,
                    to: BatchStatus::InProgress,
                    at: 2,
                },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(started.request_counts.total, lines);
        (dir, store)
    }

    async fn remove(dir: PathBuf, store: SqliteStore) {
        store.close().await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Leases at most one line at `now_ms`.
    async fn lease_one(store: &SqliteStore, now_ms: u64) -> Option<LeasedLine> {
        let lease = Lease {
            now_ms,
            until_ms: 5000,
            max: 1,
        };
        store.lease("batch_1", lease).await.unwrap().pop()
    }

    async fn states(store: &SqliteStore) -> Vec<LineState> {
        let lines = store.lines("batch_1", 0, 100).await.unwrap();
        lines.into_iter().map(|line| line.state).collect()
    }

    #[tokio::test]
    async fn a_line_moves_through_its_states_with_its_result() {
        let (dir, store) = running_store("states", 2).await;
        let first = lease_one(&store, 1000).await.unwrap();
        assert_eq!((first.line, first.attempts), (1, 0));
        let retry = Settlement::RetryAt(3000);
        assert!(store.settle("batch_1", 1, retry).await.unwrap());
        // Not due yet: the pending line comes next, then nothing until the retry is due.
        let second = lease_one(&store, 2000).await.unwrap();
        assert_eq!(second.line, 2);
        assert_eq!(lease_one(&store, 2000).await, None);
        assert_eq!(store.next_due(2000).await.unwrap(), Some(3000));
        let again = lease_one(&store, 3000).await.unwrap();
        assert_eq!((again.line, again.attempts), (1, 1));
        let out = Bytes::from_static(b"{}\n");
        let done = Settlement::Succeeded(out.clone());
        assert!(store.settle("batch_1", 1, done).await.unwrap());
        // A settled line is never settled (nor counted) twice.
        let late = Settlement::Failed(out);
        assert!(!store.settle("batch_1", 1, late).await.unwrap());
        let batch = store.batch("alice", "batch_1").await.unwrap().unwrap();
        let counts = batch.request_counts;
        assert_eq!((counts.completed, counts.failed), (1, 0));
        assert_eq!(
            states(&store).await,
            [LineState::Succeeded, LineState::Leased]
        );
        assert_eq!(store.batch("bob", "batch_1").await.unwrap(), None);
        remove(dir, store).await;
    }

    #[tokio::test]
    async fn several_lines_are_leased_at_once_retries_first() {
        let (dir, store) = running_store("several", 5).await;
        let first = lease_one(&store, 1000).await.unwrap();
        let retry = Settlement::RetryAt(1500);
        assert!(store.settle("batch_1", first.line, retry).await.unwrap());
        let lease = Lease {
            now_ms: 2000,
            until_ms: 9000,
            max: 3,
        };
        let leased = store.lease("batch_1", lease).await.unwrap();
        let lines: Vec<u64> = leased.iter().map(|line| line.line).collect();
        assert_eq!(lines, [1, 2, 3]);
        assert_eq!(leased[0].attempts, 1);
        remove(dir, store).await;
    }

    #[tokio::test]
    async fn a_batch_cancelled_while_validated_counts_the_lines_it_stored() {
        let (dir, store) = validating_store("cancel", 1).await;
        let cancel = store.cancel("alice", "batch_1", 5).await.unwrap();
        assert!(matches!(cancel, Cancel::Accepted(_)), "{cancel:?}");
        let finish = Finish {
            from: BatchStatus::Cancelling,
            status: BatchStatus::Cancelled,
            at: 6,
            output: None,
            error: None,
            errors: None,
            unfinished: 1,
        };
        let ended = store.finish("batch_1", finish).await.unwrap().unwrap();
        assert_eq!(ended.status, BatchStatus::Cancelled);
        let counts = ended.request_counts;
        assert_eq!((counts.total, counts.completed, counts.failed), (1, 0, 1));
        assert!(
            states(&store).await.is_empty(),
            "lines go with the batch's end"
        );
        remove(dir, store).await;
    }

    #[tokio::test]
    async fn leases_of_a_dead_process_are_released_and_results_kept() {
        let (dir, store) = running_store("reopen", 3).await;
        lease_one(&store, 1000).await.unwrap();
        lease_one(&store, 1000).await.unwrap();
        let done = Settlement::Succeeded(Bytes::from_static(b"{}\n"));
        store.settle("batch_1", 1, done).await.unwrap();
        store.close().await.unwrap();

        let store = SqliteStore::open(&dir).unwrap();
        let expected = [LineState::Succeeded, LineState::Pending, LineState::Pending];
        assert_eq!(states(&store).await, expected);
        let next = lease_one(&store, 1000).await.unwrap();
        assert_eq!(next.line, 2);
        remove(dir, store).await;
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_a_store_in_use() {
        let (dir, store) = running_store("exclusive", 1).await;
        // The first process holds the lock from its first statement on.
        let conn = rusqlite::Connection::open(dir.join("batches.sqlite3")).unwrap();
        conn.busy_timeout(std::time::Duration::ZERO).unwrap();
        let busy = conn.query_row("SELECT count(*) FROM lines", [], |row| row.get::<_, i64>(0));
        assert!(
            busy.is_err(),
            "the store was readable by a second connection"
        );
        drop(conn);
        remove(dir, store).await;
    }
}
