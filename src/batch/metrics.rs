//! The Batch API's metrics: lines settled, the queue of lines still to run, batches by status.

use super::model::BatchStatus;
use super::store::Stats;

pub const LINES: &str = "openrouter_batch_lines_total";
pub const QUEUE_DEPTH: &str = "openrouter_batch_queue_depth";
pub const BATCHES: &str = "openrouter_batches";

/// Line outcomes counted under `status`.
const LINE_STATUSES: [&str; 5] = ["succeeded", "failed", "retried", "cancelled", "expired"];

/// HELP lines, and every series at zero so that dashboards see the first change.
pub fn describe() {
    metrics::describe_counter!(
        LINES,
        "Batch lines by outcome: succeeded, failed, retried (an attempt to be run again), cancelled or expired (never run)."
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Batch lines not yet settled, over the batches still running."
    );
    metrics::describe_gauge!(BATCHES, "Batches in the store, by status.");
    for status in LINE_STATUSES {
        metrics::counter!(LINES, "status" => status).increment(0);
    }
    metrics::gauge!(QUEUE_DEPTH).set(0.0);
    for status in BatchStatus::ALL {
        metrics::gauge!(BATCHES, "status" => status.as_str()).set(0.0);
    }
}

/// `count` lines ended (or were rescheduled) as `status`.
pub(super) fn lines(status: &'static str, count: u64) {
    metrics::counter!(LINES, "status" => status).increment(count);
}

/// The gauges, from the store's counts.
pub(super) fn publish(stats: &Stats) {
    metrics::gauge!(QUEUE_DEPTH).set(stats.queue_depth as f64);
    for status in BatchStatus::ALL {
        let count = stats
            .batches
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, count)| *count);
        metrics::gauge!(BATCHES, "status" => status.as_str()).set(count as f64);
    }
}
