//! The `lines` table: each input line's body, state, next due time, attempts and result.
//!
//! States: `pending` (due now, `due_ms` 0), `leased` (`due_ms` is the lease's end), `retry_at`
//! (`due_ms` is when it may run again), `succeeded` and `failed` (with their result).

use rusqlite::{params, Connection, OptionalExtension};

use crate::batch::store::{LeasedLine, LineRecord, LineState, NewLine, Settlement, StoreError};

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

pub(super) fn lease(
    conn: &mut Connection,
    batch_id: &str,
    now_ms: u64,
    until_ms: u64,
) -> Result<Option<LeasedLine>, StoreError> {
    let tx = conn.transaction()?;
    let running: Option<bool> = tx
        .query_row(
            "SELECT status = 'in_progress' AND expires_at * 1000 > ?2 FROM batches WHERE id = ?1",
            params![batch_id, now_ms],
            |row| row.get(0),
        )
        .optional()?;
    if running != Some(true) {
        return Ok(None);
    }
    // A retry that is due has waited longest; then input order.
    let retry: Option<u64> = tx
        .query_row(
            "SELECT line FROM lines WHERE batch_id = ?1 AND state = 'retry_at' AND due_ms <= ?2
             ORDER BY due_ms LIMIT 1",
            params![batch_id, now_ms],
            |row| row.get(0),
        )
        .optional()?;
    let line = match retry {
        Some(line) => Some(line),
        None => tx
            .query_row(
                "SELECT line FROM lines WHERE batch_id = ?1 AND state = 'pending' AND due_ms = 0
                 ORDER BY line LIMIT 1",
                [batch_id],
                |row| row.get(0),
            )
            .optional()?,
    };
    let Some(line) = line else {
        return Ok(None);
    };
    let leased = tx.query_row(
        "UPDATE lines SET state = 'leased', due_ms = ?3 WHERE batch_id = ?1 AND line = ?2
         RETURNING custom_id, body, attempts",
        params![batch_id, line, until_ms],
        |row| {
            Ok(LeasedLine {
                line,
                custom_id: row.get(0)?,
                body: row.get::<_, Vec<u8>>(1)?.into(),
                attempts: row.get(2)?,
            })
        },
    )?;
    tx.commit()?;
    Ok(Some(leased))
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
        "SELECT min(l.due_ms) FROM lines l JOIN batches b ON b.id = l.batch_id
         WHERE l.state = 'retry_at' AND b.status = 'in_progress' AND b.expires_at * 1000 > ?1",
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
    use crate::batch::store::{BatchStore, LineState, NewLine, Settlement, Transition};

    /// A store on a fresh directory holding `batch_1` of `alice`, running, with `lines` lines.
    async fn running_store(name: &str, lines: u64) -> (PathBuf, SqliteStore) {
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

    async fn states(store: &SqliteStore) -> Vec<LineState> {
        let lines = store.lines("batch_1", 0, 100).await.unwrap();
        lines.into_iter().map(|line| line.state).collect()
    }

    #[tokio::test]
    async fn a_line_moves_through_its_states_with_its_result() {
        let (dir, store) = running_store("states", 2).await;
        let first = store.lease("batch_1", 1000, 5000).await.unwrap().unwrap();
        assert_eq!((first.line, first.attempts), (1, 0));
        let retry = Settlement::RetryAt(3000);
        assert!(store.settle("batch_1", 1, retry).await.unwrap());
        // Not due yet: the pending line comes next, then nothing until the retry is due.
        let second = store.lease("batch_1", 2000, 5000).await.unwrap().unwrap();
        assert_eq!(second.line, 2);
        assert_eq!(store.lease("batch_1", 2000, 5000).await.unwrap(), None);
        assert_eq!(store.next_due(2000).await.unwrap(), Some(3000));
        let again = store.lease("batch_1", 3000, 5000).await.unwrap().unwrap();
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
    async fn leases_of_a_dead_process_are_released_and_results_kept() {
        let (dir, store) = running_store("reopen", 3).await;
        store.lease("batch_1", 1000, 5000).await.unwrap().unwrap();
        store.lease("batch_1", 1000, 5000).await.unwrap().unwrap();
        let done = Settlement::Succeeded(Bytes::from_static(b"{}\n"));
        store.settle("batch_1", 1, done).await.unwrap();
        store.close().await.unwrap();

        let store = SqliteStore::open(&dir).unwrap();
        let expected = [LineState::Succeeded, LineState::Pending, LineState::Pending];
        assert_eq!(states(&store).await, expected);
        let next = store.lease("batch_1", 1000, 5000).await.unwrap().unwrap();
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
