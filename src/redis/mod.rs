//! State shared by every replica through Redis: the connection and its up/down state, rate limits
//! across replicas, spend budgets, and the second cache tier. Every part keeps serving without
//! Redis: limits and budgets fall back to per-replica counting, the cache tier is skipped.

mod budget;
mod client;
mod limiter;
mod store;
mod tier2;

pub use budget::{BudgetExceeded, BudgetScope, Budgets, Period};
pub use client::{Redis, RedisSettings};
pub use limiter::{RateRejection, SharedLimiter};
pub use store::REDIS;
pub use tier2::{StoredAnswer, Tier2, Tier2Hit, DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_ENTRIES};

/// 1 while Redis answers, 0 while the proxy serves without it.
pub const REDIS_UP: &str = "openrouter_redis_up";
/// Calls that could not use Redis, by `op`: failed, slower than `op_timeout`, or skipped while it
/// is down.
pub const REDIS_ERRORS: &str = "openrouter_redis_errors_total";
/// Spend in USD of the current UTC day or month, by `scope` (token, route), `name` and `period`.
pub const BUDGET_SPENT: &str = "openrouter_budget_spent_usd";
/// Answers not written to the second cache tier because its write queue was full.
pub const TIER2_DROPPED: &str = "openrouter_cache_tier2_writes_dropped_total";

/// The `op` label values of [`REDIS_ERRORS`].
pub mod op {
    pub const RATE_LIMIT: &str = "rate_limit";
    pub const BUDGET_CHECK: &str = "budget_check";
    pub const BUDGET_RECORD: &str = "budget_record";
    pub const CACHE_GET: &str = "cache_get";
    pub const CACHE_PUT: &str = "cache_put";
    /// Calls of the Batch API's shared store.
    pub const BATCH: &str = "batch";
    pub const ALL: [&str; 6] = [
        RATE_LIMIT,
        BUDGET_CHECK,
        BUDGET_RECORD,
        CACHE_GET,
        CACHE_PUT,
        BATCH,
    ];
}

/// Adds HELP lines for this module's metrics (the metrics init path calls it at start-up; a
/// family with no series yet renders nothing, so a proxy without Redis shows none of them).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        REDIS_UP,
        "1 while Redis answers, 0 while serving without it."
    );
    metrics::describe_counter!(
        REDIS_ERRORS,
        "Redis calls that failed, took longer than op_timeout, or were skipped while Redis was down, by op."
    );
    metrics::describe_gauge!(
        BUDGET_SPENT,
        "Spend in USD of the current UTC day or month, by scope, name and period."
    );
    metrics::describe_counter!(
        TIER2_DROPPED,
        "Answers not written to the Redis cache tier because its write queue was full."
    );
}

/// Starts the error counters at zero, so that `increase()` sees the first error: once, when the
/// first Redis handle of the process is built.
fn start_counters() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        for op in op::ALL {
            metrics::counter!(REDIS_ERRORS, "op" => op).increment(0);
        }
        metrics::counter!(TIER2_DROPPED).increment(0);
    });
}

/// 128 bits of SHA-256 over length-prefixed parts: the id in a key, so that no user text (a
/// token or route name) appears in Redis.
fn hashed(parts: &[&[u8]]) -> u128 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let digest = context.finish();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_be_bytes(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cannot_be_shifted() {
        assert_ne!(hashed(&[b"ab", b"c"]), hashed(&[b"a", b"bc"]));
        assert_eq!(hashed(&[b"route", b"a"]), hashed(&[b"route", b"a"]));
    }
}
