//! Batches: `b:<id>` holds the owner, the OpenAI object, and beside it the status, window,
//! creation order and the live `request_counts`; `bo:<owner>` and `bs:<status>` list them in
//! creation order, `be` by the time they ended. A change of status is written only if the status
//! is still the one it was read in, so that replicas never both move a batch.

use ::redis::Cmd;

use super::files::{insert_ops, record_error};
use super::{lines, owner_key, valid_id, Ops, Shared};
use crate::batch::model::{Batch, BatchErrors, BatchStatus, ListQuery, RequestCounts};
use crate::batch::store::{Cancel, Finish, Progress, Stats, StoreError, StoredBatch, Transition};

const FIELDS: [&str; 9] = [
    "owner",
    "object",
    "status",
    "endpoint",
    "expires_at",
    "total",
    "completed",
    "failed",
    "seq",
];
/// Statuses in which a batch still has lines to run or results to write.
const ACTIVE: [BatchStatus; 3] = [
    BatchStatus::InProgress,
    BatchStatus::Finalizing,
    BatchStatus::Cancelling,
];

pub(super) fn batch_key(shared: &Shared, id: &str) -> String {
    shared.key(&format!("b:{id}"))
}

fn by_owner(shared: &Shared, owner: &str) -> String {
    shared.key(&format!("bo:{}", owner_key(owner)))
}

fn by_status(shared: &Shared, status: BatchStatus) -> String {
    shared.key(&format!("bs:{}", status.as_str()))
}

type Row = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// A batch as stored, with the fields the queries need.
struct Record {
    stored: StoredBatch,
    endpoint: String,
    expires_at: u64,
    seq: u64,
}

async fn read(shared: &Shared, id: &str) -> Result<Option<Record>, StoreError> {
    if !valid_id(id) {
        return Ok(None);
    }
    let row: Row = shared
        .query(&Cmd::hmget(batch_key(shared, id), &FIELDS[..]))
        .await?;
    let (
        Some(owner),
        Some(object),
        Some(_),
        Some(endpoint),
        Some(expires_at),
        total,
        completed,
        failed,
        seq,
    ) = row
    else {
        return Ok(None);
    };
    let mut batch: Batch = serde_json::from_str(&object).map_err(record_error)?;
    batch.request_counts = RequestCounts {
        total: total.unwrap_or(0),
        completed: completed.unwrap_or(0),
        failed: failed.unwrap_or(0),
    };
    Ok(Some(Record {
        stored: StoredBatch { owner, batch },
        endpoint,
        expires_at,
        seq: seq.unwrap_or(0),
    }))
}

pub(super) async fn get(
    shared: &Shared,
    owner: Option<&str>,
    id: &str,
) -> Result<Option<StoredBatch>, StoreError> {
    let record = read(shared, id).await?;
    Ok(record
        .map(|record| record.stored)
        .filter(|stored| owner.is_none_or(|owner| stored.owner == owner)))
}

pub(super) async fn insert(shared: &Shared, owner: &str, batch: &Batch) -> Result<(), StoreError> {
    let seq = shared.next_seq().await?.to_string();
    let key = batch_key(shared, &batch.id);
    let object = serde_json::to_string(batch).map_err(record_error)?;
    let expires = batch.expires_at.unwrap_or(u64::MAX >> 12).to_string();
    let mut ops = Ops::default();
    ops.op(&[
        b"HSET",
        key.as_bytes(),
        b"owner",
        owner.as_bytes(),
        b"object",
        object.as_bytes(),
        b"status",
        batch.status.as_str().as_bytes(),
        b"endpoint",
        batch.endpoint.as_bytes(),
        b"expires_at",
        expires.as_bytes(),
        b"seq",
        seq.as_bytes(),
        b"total",
        b"0",
        b"completed",
        b"0",
        b"failed",
        b"0",
    ]);
    for index in [by_owner(shared, owner), by_status(shared, batch.status)] {
        ops.op(&[
            b"ZADD",
            index.as_bytes(),
            seq.as_bytes(),
            batch.id.as_bytes(),
        ]);
    }
    shared.guarded(&key, "", "", ops).await?;
    Ok(())
}

/// Ids of `index` in creation order (newest first when `reverse`), after `after` (exclusive).
async fn ids(
    shared: &Shared,
    index: &str,
    after: Option<f64>,
    limit: usize,
    reverse: bool,
) -> Result<Vec<String>, StoreError> {
    let count = isize::try_from(limit).unwrap_or(isize::MAX);
    let cmd = match (reverse, after) {
        (true, Some(seq)) => {
            Cmd::zrevrangebyscore_limit(index, format!("({seq}"), "-inf", 0, count)
        }
        (true, None) => Cmd::zrevrangebyscore_limit(index, "+inf", "-inf", 0, count),
        (false, _) => Cmd::zrangebyscore_limit(index, "-inf", "+inf", 0, count),
    };
    shared.query(&cmd).await
}

pub(super) async fn list(
    shared: &Shared,
    owner: &str,
    query: &ListQuery,
) -> Result<Vec<Batch>, StoreError> {
    let index = by_owner(shared, owner);
    let after = shared.cursor(&index, query.after.as_ref()).await?;
    let mut batches = Vec::new();
    for id in ids(shared, &index, after, query.limit.saturating_add(1), true).await? {
        if let Some(record) = read(shared, &id).await? {
            batches.push(record.stored.batch);
        }
    }
    Ok(batches)
}

async fn records_in(shared: &Shared, status: BatchStatus) -> Result<Vec<Record>, StoreError> {
    let mut records = Vec::new();
    for id in ids(shared, &by_status(shared, status), None, usize::MAX, false).await? {
        if let Some(record) = read(shared, &id).await? {
            // The index may lag a status changed by a script that ran since.
            if record.stored.batch.status == status {
                records.push(record);
            }
        }
    }
    Ok(records)
}

pub(super) async fn in_status(
    shared: &Shared,
    status: BatchStatus,
) -> Result<Vec<StoredBatch>, StoreError> {
    let mut batches = Vec::new();
    for record in records_in(shared, status).await? {
        if status != BatchStatus::Validating
            || lines::claim_validation(shared, &record.stored.batch.id).await?
        {
            batches.push(record.stored);
        }
    }
    Ok(batches)
}

/// The commands that write `batch` back after a change from `from`.
fn save_ops(
    shared: &Shared,
    ops: &mut Ops,
    (batch, seq): (&Batch, u64),
    from: BatchStatus,
) -> Result<(), StoreError> {
    let key = batch_key(shared, &batch.id);
    let object = serde_json::to_string(batch).map_err(record_error)?;
    let status = batch.status.as_str();
    ops.op(&[
        b"HSET",
        key.as_bytes(),
        b"object",
        object.as_bytes(),
        b"status",
        status.as_bytes(),
    ]);
    if from != batch.status {
        let seq = seq.to_string();
        ops.op(&[
            b"ZREM",
            by_status(shared, from).as_bytes(),
            batch.id.as_bytes(),
        ]);
        ops.op(&[
            b"ZADD",
            by_status(shared, batch.status).as_bytes(),
            seq.as_bytes(),
            batch.id.as_bytes(),
        ]);
    }
    if batch.status.is_final() {
        let ended = (batch.completed_at.max(batch.failed_at))
            .max(batch.expired_at.max(batch.cancelled_at))
            .unwrap_or(batch.created_at)
            .to_string();
        ops.op(&[
            b"ZADD",
            shared.key("be").as_bytes(),
            ended.as_bytes(),
            batch.id.as_bytes(),
        ]);
    }
    Ok(())
}

/// Changes the batch `id` if it is in `from`: `change` edits it and adds the commands written
/// with it. `None` when it was not in `from` (here, or by the time the change is written).
async fn update(
    shared: &Shared,
    id: &str,
    from: BatchStatus,
    change: impl FnOnce(&mut Batch, &mut Ops) -> Result<(), StoreError>,
) -> Result<Option<Batch>, StoreError> {
    let Some(record) = read(shared, id).await? else {
        return Ok(None);
    };
    let (mut batch, seq) = (record.stored.batch, record.seq);
    if batch.status != from {
        return Ok(None);
    }
    let mut ops = Ops::default();
    change(&mut batch, &mut ops)?;
    save_ops(shared, &mut ops, (&batch, seq), from)?;
    let written = shared
        .guarded(&batch_key(shared, id), "status", from.as_str(), ops)
        .await?;
    Ok(written.then_some(batch))
}

pub(super) async fn transition(
    shared: &Shared,
    id: &str,
    change: Transition,
) -> Result<Option<Batch>, StoreError> {
    // Lines change only while the batch is validated, by the replica now moving it.
    let total = if change.to == BatchStatus::InProgress {
        Some(lines::count(shared, id).await?)
    } else {
        None
    };
    let key = batch_key(shared, id);
    update(shared, id, change.from, |batch, ops| {
        if let Some(total) = total {
            let text = total.to_string();
            ops.op(&[b"HSET", key.as_bytes(), b"total", text.as_bytes()]);
            batch.request_counts.total = total;
        }
        batch.enter(change.to, change.at);
        Ok(())
    })
    .await
}

pub(super) async fn cancel(
    shared: &Shared,
    owner: &str,
    id: &str,
    at: u64,
) -> Result<Cancel, StoreError> {
    // A status moved by another replica meanwhile is read again.
    loop {
        let Some(stored) = get(shared, Some(owner), id).await? else {
            return Ok(Cancel::NotFound);
        };
        let batch = stored.batch;
        let from = batch.status;
        match from {
            BatchStatus::Validating | BatchStatus::InProgress => {
                let cancelled = update(shared, id, from, |batch, _| {
                    batch.enter(BatchStatus::Cancelling, at);
                    Ok(())
                })
                .await?;
                if let Some(batch) = cancelled {
                    return Ok(Cancel::Accepted(batch));
                }
            }
            BatchStatus::Cancelling | BatchStatus::Cancelled => return Ok(Cancel::Accepted(batch)),
            _ => return Ok(Cancel::Finished(batch)),
        }
    }
}

fn progress(record: Record, leased: u64) -> Progress {
    let counts = &record.stored.batch.request_counts;
    Progress {
        id: record.stored.batch.id.clone(),
        owner: record.stored.owner.clone(),
        endpoint: record.endpoint.clone(),
        status: record.stored.batch.status,
        expires_at: record.expires_at,
        settled: counts.completed + counts.failed >= counts.total,
        leased,
    }
}

pub(super) async fn running(shared: &Shared, now_secs: u64) -> Result<Vec<Progress>, StoreError> {
    let records = records_in(shared, BatchStatus::InProgress).await?;
    Ok(records
        .into_iter()
        .filter(|record| record.expires_at > now_secs)
        .map(|record| progress(record, 0))
        .collect())
}

pub(super) async fn active(shared: &Shared) -> Result<Vec<Progress>, StoreError> {
    let mut active = Vec::new();
    for status in ACTIVE {
        for record in records_in(shared, status).await? {
            let leased = lines::held(shared, &record.stored.batch.id).await?;
            active.push(progress(record, leased));
        }
    }
    Ok(active)
}

pub(super) async fn finish(
    shared: &Shared,
    id: &str,
    finish: Finish,
) -> Result<Option<Batch>, StoreError> {
    let mut seqs = Vec::new();
    for _ in finish.output.iter().chain(&finish.error) {
        seqs.push(shared.next_seq().await?);
    }
    let key = batch_key(shared, id);
    update(shared, id, finish.from, |batch, ops| {
        for (file, seq) in finish.output.iter().chain(&finish.error).zip(&seqs) {
            insert_ops(shared, ops, file, *seq)?;
        }
        let Finish {
            output,
            error,
            errors,
            unfinished,
            status,
            at,
            ..
        } = finish;
        batch.enter(status, at);
        batch.errors = errors.map(|data| BatchErrors {
            object: "list".to_owned(),
            data,
        });
        (batch.output_file_id, batch.error_file_id) =
            (output.map(|f| f.object.id), error.map(|f| f.object.id));
        // A batch cancelled while validated never had its total fixed: its stored lines count.
        let counts = &mut batch.request_counts;
        counts.failed += unfinished;
        counts.total = counts.total.max(counts.completed + counts.failed);
        let (failed, total) = (counts.failed.to_string(), counts.total.to_string());
        ops.op(&[
            b"HSET",
            key.as_bytes(),
            b"failed",
            failed.as_bytes(),
            b"total",
            total.as_bytes(),
        ]);
        lines::drop_ops(shared, ops, id);
        Ok(())
    })
    .await
}

/// Removes batches that ended before `before` (Unix seconds), with any lines left.
pub(super) async fn sweep(shared: &Shared, before: u64) -> Result<u64, StoreError> {
    let ended = shared.key("be");
    let old: Vec<String> = shared
        .query(&Cmd::zrangebyscore(&ended, "-inf", format!("({before}")))
        .await?;
    let mut removed = 0;
    for id in old {
        let mut ops = Ops::default();
        ops.op(&[b"ZREM", ended.as_bytes(), id.as_bytes()]);
        if let Some(record) = read(shared, &id).await? {
            let key = batch_key(shared, &id);
            ops.op(&[b"DEL", key.as_bytes()]);
            ops.op(&[
                b"ZREM",
                by_owner(shared, &record.stored.owner).as_bytes(),
                id.as_bytes(),
            ]);
            let status = record.stored.batch.status;
            ops.op(&[b"ZREM", by_status(shared, status).as_bytes(), id.as_bytes()]);
            lines::drop_ops(shared, &mut ops, &id);
            removed += 1;
        }
        shared.guarded(&ended, "", "", ops).await?;
    }
    Ok(removed)
}

pub(super) async fn stats(shared: &Shared) -> Result<Stats, StoreError> {
    let mut queue_depth = 0;
    for status in ACTIVE {
        for record in records_in(shared, status).await? {
            let counts = record.stored.batch.request_counts;
            queue_depth += counts
                .total
                .saturating_sub(counts.completed + counts.failed);
        }
    }
    let mut batches = Vec::new();
    for status in BatchStatus::ALL {
        let count: u64 = shared.query(&Cmd::zcard(by_status(shared, status))).await?;
        if count > 0 {
            batches.push((status, count));
        }
    }
    Ok(Stats {
        queue_depth,
        batches,
    })
}
