//! A batch's lines: hashes by line number under `l:<batch>:` (`cid`, `body`, `state`, `att`
//! attempts, `res` results, `hold` the lease token, `ent` the stream entry), the line numbers in
//! input order (`n`), the stream of lines to run (`q`, consumer group `w`) and the retries by due
//! time (`due`).

use ::redis::Cmd;

use super::batches::{batch_key, running};
use super::{Ops, Shared};
use crate::batch::model::new_id;
use crate::batch::store::{
    Lease, LeasedLine, LineRecord, LineState, NewLine, Settlement, StoreError,
};

const PARTS: [&str; 10] = [
    "cid", "body", "state", "att", "res", "hold", "ent", "q", "due", "n",
];

fn part(shared: &Shared, batch_id: &str, name: &str) -> String {
    shared.key(&format!("l:{batch_id}:{name}"))
}

/// The commands that drop every key of a batch's lines.
pub(super) fn drop_ops(shared: &Shared, ops: &mut Ops, batch_id: &str) {
    let keys: Vec<String> = PARTS
        .iter()
        .map(|name| part(shared, batch_id, name))
        .collect();
    let mut command: Vec<&[u8]> = vec![b"DEL"];
    command.extend(keys.iter().map(|key| key.as_bytes()));
    ops.op(&command);
}

/// Whether this replica may validate the batch now (see [`super::scripts::CLAIM_VALIDATION`]).
pub(super) async fn claim_validation(shared: &Shared, batch_id: &str) -> Result<bool, StoreError> {
    let now = crate::batch::model::unix_millis(std::time::SystemTime::now());
    let until = now.saturating_add(crate::batch::model::millis(shared.claim_after));
    let args =
        [shared.consumer.clone(), now.to_string(), until.to_string()].map(String::into_bytes);
    let claimed: i64 = shared
        .script(
            &shared.claim_validation,
            &[batch_key(shared, batch_id)],
            &args,
        )
        .await?;
    Ok(claimed == 1)
}

fn lost_validation() -> StoreError {
    StoreError("another replica validates this batch now".to_owned())
}

pub(super) async fn clear(shared: &Shared, batch_id: &str) -> Result<(), StoreError> {
    let mut ops = Ops::default();
    drop_ops(shared, &mut ops, batch_id);
    let key = batch_key(shared, batch_id);
    if !shared
        .guarded(&key, "validator", &shared.consumer, ops)
        .await?
    {
        return Err(lost_validation());
    }
    Ok(())
}

pub(super) async fn add(
    shared: &Shared,
    batch_id: &str,
    lines: &[NewLine],
) -> Result<(), StoreError> {
    let [cid, body, state, n, q] =
        ["cid", "body", "state", "n", "q"].map(|name| part(shared, batch_id, name));
    let mut ops = Ops::default();
    ops.op(&[b"?XGROUP", b"CREATE", q.as_bytes(), b"w", b"0", b"MKSTREAM"]);
    for line in lines {
        let number = line.line.to_string();
        let number = number.as_bytes();
        ops.op(&[b"HSET", cid.as_bytes(), number, line.custom_id.as_bytes()]);
        ops.op(&[b"HSET", body.as_bytes(), number, &line.body]);
        ops.op(&[b"HSET", state.as_bytes(), number, b"pending"]);
        ops.op(&[b"ZADD", n.as_bytes(), number, number]);
        ops.op(&[b"XADD", q.as_bytes(), b"*", b"l", number]);
    }
    // Validating a large file keeps the claim on it.
    let now = crate::batch::model::unix_millis(std::time::SystemTime::now());
    let until = now
        .saturating_add(crate::batch::model::millis(shared.claim_after))
        .to_string();
    let key = batch_key(shared, batch_id);
    ops.op(&[
        b"HSET",
        key.as_bytes(),
        b"validator_until",
        until.as_bytes(),
    ]);
    if !shared
        .guarded(&key, "validator", &shared.consumer, ops)
        .await?
    {
        return Err(lost_validation());
    }
    Ok(())
}

/// Lines stored for a batch.
pub(super) async fn count(shared: &Shared, batch_id: &str) -> Result<u64, StoreError> {
    shared.query(&Cmd::zcard(part(shared, batch_id, "n"))).await
}

/// Lines held by a consumer that is still within `claim_after` (one held longer belongs to a
/// replica that stopped: nobody will settle it unless the batch runs on).
pub(super) async fn held(shared: &Shared, batch_id: &str) -> Result<u64, StoreError> {
    let q = part(shared, batch_id, "q");
    let exists: bool = shared.query(&Cmd::exists(&q)).await?;
    if !exists {
        return Ok(0);
    }
    let mut cmd = ::redis::cmd("XPENDING");
    cmd.arg(&q).arg("w").arg("-").arg("+").arg(10_000);
    let pending: Vec<(String, String, u64, u64)> = shared.query(&cmd).await?;
    let claim = crate::batch::model::millis(shared.claim_after);
    Ok(pending
        .iter()
        .filter(|(_, _, idle, _)| *idle < claim)
        .count() as u64)
}

/// The keys of [`super::scripts::LEASE`] and [`super::scripts::SETTLE`] after the batch's.
const LEASE_KEYS: [&str; 8] = ["q", "due", "state", "hold", "cid", "body", "att", "ent"];
const SETTLE_KEYS: [&str; 7] = ["q", "due", "state", "hold", "att", "res", "ent"];

fn script_keys(shared: &Shared, batch_id: &str, parts: &[&str]) -> Vec<String> {
    let mut keys = vec![batch_key(shared, batch_id)];
    keys.extend(parts.iter().map(|name| part(shared, batch_id, name)));
    keys
}

type Leased = (u64, String, Vec<u8>, u32);

pub(super) async fn lease(
    shared: &Shared,
    batch_id: &str,
    lease: Lease,
) -> Result<Vec<LeasedLine>, StoreError> {
    if lease.max == 0 {
        return Ok(Vec::new());
    }
    let keys = script_keys(shared, batch_id, &LEASE_KEYS);
    let token = new_id("");
    let claim = crate::batch::model::millis(shared.claim_after);
    let args = [
        lease.now_ms.to_string(),
        lease.max.to_string(),
        claim.to_string(),
        shared.consumer.clone(),
        token.clone(),
    ]
    .map(String::into_bytes);
    let leased: Vec<Leased> = shared.script(&shared.lease, &keys, &args).await?;
    Ok(leased
        .into_iter()
        .map(|(line, custom_id, body, attempts)| {
            shared.hold(batch_id, line, &token);
            LeasedLine {
                line,
                custom_id,
                body: body.into(),
                attempts,
            }
        })
        .collect())
}

pub(super) async fn settle(
    shared: &Shared,
    batch_id: &str,
    line: u64,
    settlement: &Settlement,
) -> Result<bool, StoreError> {
    let Some(token) = shared.release(batch_id, line) else {
        return Ok(false);
    };
    let (state, due, result, counter): (&str, u64, &[u8], &str) = match settlement {
        Settlement::Succeeded(result) => ("succeeded", 0, result, "completed"),
        Settlement::Failed(result) => ("failed", 0, result, "failed"),
        Settlement::RetryAt(at) => ("retry_at", *at, b"", ""),
    };
    let keys = script_keys(shared, batch_id, &SETTLE_KEYS);
    let args = [
        line.to_string().into_bytes(),
        token.into_bytes(),
        state.as_bytes().to_vec(),
        due.to_string().into_bytes(),
        result.to_vec(),
        counter.as_bytes().to_vec(),
    ];
    let settled: i64 = shared.script(&shared.settle, &keys, &args).await?;
    Ok(settled == 1)
}

pub(super) async fn next_due(shared: &Shared, now_ms: u64) -> Result<Option<u64>, StoreError> {
    let mut earliest: Option<u64> = None;
    for batch in running(shared, now_ms / 1000).await? {
        let first: Vec<(String, u64)> = shared
            .query(&Cmd::zrange_withscores(
                part(shared, &batch.id, "due"),
                0,
                0,
            ))
            .await?;
        if let Some((_, due)) = first.first() {
            earliest = Some(earliest.map_or(*due, |earliest| earliest.min(*due)));
        }
    }
    Ok(earliest)
}

fn state(text: Option<&str>) -> LineState {
    match text {
        Some("pending") => LineState::Pending,
        Some("leased") => LineState::Leased,
        Some("retry_at") => LineState::RetryAt,
        Some("succeeded") => LineState::Succeeded,
        _ => LineState::Failed,
    }
}

pub(super) async fn page(
    shared: &Shared,
    batch_id: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<LineRecord>, StoreError> {
    let count = isize::try_from(limit).unwrap_or(isize::MAX);
    let numbers: Vec<u64> = shared
        .query(&Cmd::zrangebyscore_limit(
            part(shared, batch_id, "n"),
            format!("({after}"),
            "+inf",
            0,
            count,
        ))
        .await?;
    if numbers.is_empty() {
        return Ok(Vec::new());
    }
    let [cid, state_key, res] = ["cid", "state", "res"].map(|name| part(shared, batch_id, name));
    let ids: Vec<Option<String>> = shared.query(&Cmd::hmget(&cid, &numbers)).await?;
    let states: Vec<Option<String>> = shared.query(&Cmd::hmget(&state_key, &numbers)).await?;
    let results: Vec<Option<Vec<u8>>> = shared.query(&Cmd::hmget(&res, &numbers)).await?;
    Ok(numbers
        .into_iter()
        .zip(ids)
        .zip(states.into_iter().zip(results))
        .map(|((line, custom_id), (line_state, result))| LineRecord {
            line,
            custom_id: custom_id.unwrap_or_default(),
            state: state(line_state.as_deref()),
            result: result.map(Into::into),
        })
        .collect())
}
