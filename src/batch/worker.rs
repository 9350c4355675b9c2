//! The dispatcher: keeps up to `concurrency` lines in flight, taking them round robin across the
//! running batches, pausing while live traffic is above `yield_above`, and settling each line's
//! attempt (result, or retry time as data) in the store.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::executor::LineRequest;
use super::model::{millis, random_fraction, unix_millis, unix_secs};
use super::outcome::{decide, Attempt, RetryPolicy};
use super::store::{Lease, LeasedLine, Progress, Settlement, StoreError};
use super::{metrics, stopped, Inner};

/// Longest sleep with nothing to do: bounds how late a clock change or a missed wake-up is seen.
const IDLE_MAX: Duration = Duration::from_secs(1);
/// How often a paused dispatcher looks at the live traffic again.
const YIELD_POLL: Duration = Duration::from_millis(10);
/// A retry already due that the store would not lease (its batch just stopped) is looked at
/// again after this, rather than at once.
const IDLE_MIN: Duration = Duration::from_millis(10);

/// A leased line and the batch it belongs to.
struct Work {
    batch: Progress,
    line: LeasedLine,
}

/// Runs until the service stops; then gives the lines in flight their grace and drops the rest.
pub(super) async fn dispatch(inner: Arc<Inner>, mut stop: watch::Receiver<Option<Duration>>) {
    let permits = Arc::new(Semaphore::new(inner.config.concurrency));
    let mut running = JoinSet::new();
    let mut turn = 0;
    loop {
        while running.try_join_next().is_some() {}
        let first = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            () = stopped(&mut stop) => break,
        };
        let Ok(first) = first else { break };
        if !room_for_batch_work(&inner, &mut stop).await {
            break;
        }
        // Every free slot is filled from one look at the store.
        let mut free = vec![first];
        free.extend(std::iter::from_fn(|| {
            permits.clone().try_acquire_owned().ok()
        }));
        let leased = next_lines(&inner, &mut turn, free.len()).await;
        let work = leased.unwrap_or_else(|error| {
            tracing::warn!(%error, "batch workers could not read the store");
            Vec::new()
        });
        let idle_now = work.is_empty();
        for (work, permit) in work.into_iter().zip(free) {
            running.spawn(run_line(inner.clone(), work, permit));
        }
        if idle_now && !idle(&inner, &mut stop).await {
            break;
        }
    }
    let grace = stop.borrow().unwrap_or_default();
    let _ = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    running.shutdown().await;
}

/// Waits while live traffic is above `yield_above`; `false` when the service stops meanwhile.
async fn room_for_batch_work(inner: &Inner, stop: &mut watch::Receiver<Option<Duration>>) -> bool {
    while inner.busy() {
        tokio::select! {
            () = tokio::time::sleep(YIELD_POLL) => {}
            () = stopped(stop) => return false,
        }
    }
    true
}

/// Leases up to `wanted` due lines, shared out over the running batches in turn from where the
/// last lease left off (what one batch cannot use goes to the next), so that every running batch
/// progresses.
async fn next_lines(
    inner: &Inner,
    turn: &mut usize,
    wanted: usize,
) -> Result<Vec<Work>, StoreError> {
    let now = inner.now();
    let now_ms = unix_millis(now);
    let until_ms = now_ms.saturating_add(millis(inner.config.claim_after));
    let batches = inner.store.running(unix_secs(now)).await?;
    let count = batches.len();
    let mut work = Vec::with_capacity(wanted);
    for k in 0..count {
        let left = wanted - work.len();
        if left == 0 {
            break;
        }
        let i = (*turn + k) % count;
        let lease = Lease {
            now_ms,
            until_ms,
            max: left.div_ceil(count - k),
        };
        let leased = inner.store.lease(&batches[i].id, lease).await?;
        if !leased.is_empty() {
            *turn = (i + 1) % count;
        }
        work.extend(leased.into_iter().map(|line| Work {
            batch: batches[i].clone(),
            line,
        }));
    }
    Ok(work)
}

/// Nothing to lease: sleeps until the next retry is due, a wake-up, or [`IDLE_MAX`]. `false`
/// when the service stops meanwhile.
async fn idle(inner: &Inner, stop: &mut watch::Receiver<Option<Duration>>) -> bool {
    let now_ms = unix_millis(inner.now());
    let wait = match inner.store.next_due(now_ms).await {
        Ok(Some(due)) => Duration::from_millis(due.saturating_sub(now_ms)).max(IDLE_MIN),
        _ => IDLE_MAX,
    };
    tokio::select! {
        () = inner.work.notified() => true,
        () = tokio::time::sleep(wait.min(IDLE_MAX)) => true,
        () = stopped(stop) => false,
    }
}

/// One attempt at a line, settled in the store. The lease bounds it: an attempt still running
/// after `claim_after` is dropped and counts as a timeout.
async fn run_line(inner: Arc<Inner>, work: Work, _permit: OwnedSemaphorePermit) {
    let Work { batch, line } = work;
    let request = LineRequest {
        owner: batch.owner.clone(),
        batch_id: batch.id.clone(),
        custom_id: line.custom_id.clone(),
        path: batch.endpoint.clone(),
        body: line.body.clone(),
    };
    let attempt =
        match tokio::time::timeout(inner.config.claim_after, inner.executor.execute(request)).await
        {
            Ok(outcome) => Attempt::Done(outcome),
            Err(_) => Attempt::TimedOut,
        };
    let policy = RetryPolicy {
        base: inner.config.retry_base,
        max_retries: inner.config.max_retries,
    };
    let now_ms = unix_millis(inner.now());
    let (settlement, status) = decide(
        &attempt,
        &line.custom_id,
        line.attempts,
        policy,
        now_ms,
        random_fraction(),
    );
    let settled_for_good = !matches!(settlement, Settlement::RetryAt(_));
    match inner.store.settle(&batch.id, line.line, settlement).await {
        Ok(true) => metrics::lines(status, 1),
        // The line was no longer leased (a batch ends only once no line is): nothing to record.
        Ok(false) => {}
        Err(error) => tracing::warn!(
            %error,
            batch = %batch.id,
            "could not record a batch line's result; it runs again after a restart"
        ),
    }
    inner.work.notify_one();
    if settled_for_good {
        inner.lifecycle.notify_one();
    }
}
