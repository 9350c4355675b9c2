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
use super::store::{LeasedLine, Progress, Settlement, StoreError};
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
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            () = stopped(&mut stop) => break,
        };
        let Ok(permit) = permit else { break };
        if !room_for_batch_work(&inner, &mut stop).await {
            break;
        }
        match next_line(&inner, &mut turn).await {
            Ok(Some(work)) => {
                running.spawn(run_line(inner.clone(), work, permit));
            }
            Ok(None) => {
                drop(permit);
                if !idle(&inner, &mut stop).await {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "batch workers could not read the store");
                drop(permit);
                if !idle(&inner, &mut stop).await {
                    break;
                }
            }
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

/// Leases the next due line, trying the running batches in turn from where the last lease left
/// off, so that every running batch progresses.
async fn next_line(inner: &Inner, turn: &mut usize) -> Result<Option<Work>, StoreError> {
    let now = inner.now();
    let (now_ms, now_secs) = (unix_millis(now), unix_secs(now));
    let until_ms = now_ms.saturating_add(millis(inner.config.claim_after));
    let batches = inner.store.running(now_secs).await?;
    let count = batches.len();
    for k in 0..count {
        let i = (*turn + k) % count;
        if let Some(line) = inner.store.lease(&batches[i].id, now_ms, until_ms).await? {
            *turn = (i + 1) % count;
            let batch = batches[i].clone();
            return Ok(Some(Work { batch, line }));
        }
    }
    Ok(None)
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
