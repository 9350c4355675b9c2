//! Metric names, the recording helpers the pipeline calls, and the Prometheus recorder the admin
//! listener renders.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "openrouter_requests_total";
pub const LATENCY: &str = "openrouter_request_latency_seconds";
pub const TIME_TO_FIRST_BYTE: &str = "openrouter_time_to_first_byte_seconds";
pub const TOKENS: &str = "openrouter_tokens_total";
pub const COST: &str = "openrouter_cost_usd_total";
pub const ACTIVE: &str = "openrouter_active_requests";
pub const FALLBACKS: &str = "openrouter_fallbacks_total";
pub const CACHE: &str = "openrouter_cache_requests_total";
pub const RELOADS: &str = "openrouter_config_reloads_total";
pub const UPSTREAM_ATTEMPTS: &str = "openrouter_upstream_attempts_total";
pub const COOLDOWN: &str = "openrouter_model_cooldown";

/// LLM calls take from milliseconds (cache hits, embeddings) to minutes (long generations).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Several in-process servers (as in
/// tests) share it.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(LATENCY.into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(TIME_TO_FIRST_BYTE.into()), LATENCY_BUCKETS)
            });
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            // Only an empty bucket list fails, and ours are constants.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // A recorder installed earlier (by an embedding program) keeps working; ours then renders
        // nothing, which is the embedding program's choice.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Describes the families so `/metrics` carries HELP lines, and sets gauges to zero.
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "Requests answered, by route, served model and status."
    );
    metrics::describe_histogram!(
        LATENCY,
        metrics::Unit::Seconds,
        "Request duration until the last byte."
    );
    metrics::describe_histogram!(
        TIME_TO_FIRST_BYTE,
        metrics::Unit::Seconds,
        "Time from request start until the first response body byte reached the client."
    );
    metrics::describe_counter!(
        TOKENS,
        "Tokens reported by the upstream's usage, by model and type."
    );
    metrics::describe_counter!(
        COST,
        "Cost in USD reported by the upstream's usage, by model."
    );
    metrics::describe_gauge!(ACTIVE, "Requests in flight.");
    metrics::describe_counter!(FALLBACKS, "Moves to the next model in a fallback chain.");
    metrics::describe_counter!(CACHE, "Cache lookups by result.");
    metrics::describe_counter!(
        CACHE_EVICTIONS,
        "Cache entries removed by the byte bound or their TTL."
    );
    metrics::describe_gauge!(CACHE_ENTRIES, "Answers held in the cache.");
    metrics::describe_counter!(
        CACHE_COALESCED,
        "Requests that waited for an identical request's answer instead of calling the upstream."
    );
    metrics::describe_gauge!(CACHE_BYTES, "Bytes of answers held in the cache.");
    metrics::describe_counter!(RELOADS, "Config reloads by result.");
    metrics::describe_counter!(UPSTREAM_ATTEMPTS, "Upstream attempts by model and outcome.");
    metrics::describe_gauge!(
        COOLDOWN,
        "1 while a model is skipped after repeated failures."
    );
    gauge!(ACTIVE).set(0.0);
}

pub fn request_started() {
    gauge!(ACTIVE).increment(1.0);
}

/// Records a finished request (answered, failed, or abandoned by the client).
pub fn request_finished(
    route: &str,
    model: &str,
    status: u16,
    duration: Duration,
    first_byte: Option<Duration>,
) {
    gauge!(ACTIVE).decrement(1.0);
    let labels = [("route", route.to_owned()), ("model", model.to_owned())];
    counter!(REQUESTS, "route" => route.to_owned(), "model" => model.to_owned(), "status" => status.to_string())
        .increment(1);
    histogram!(LATENCY, &labels).record(duration.as_secs_f64());
    if let Some(first_byte) = first_byte {
        histogram!(TIME_TO_FIRST_BYTE, &labels).record(first_byte.as_secs_f64());
    }
}

pub fn upstream_attempt(model: &str, outcome: &'static str) {
    counter!(UPSTREAM_ATTEMPTS, "model" => model.to_owned(), "outcome" => outcome).increment(1);
}

pub fn cooldown(model: &str, cooling: bool) {
    gauge!(COOLDOWN, "model" => model.to_owned()).set(if cooling { 1.0 } else { 0.0 });
}

pub fn fallback(from: &str, to: &str, reason: &str) {
    counter!(FALLBACKS, "from" => from.to_owned(), "to" => to.to_owned(), "reason" => reason.to_owned())
        .increment(1);
}

/// Tokens and cost reported by the upstream for one answer.
pub fn usage(model: &str, usage: &crate::sse::Usage) {
    counter!(TOKENS, "model" => model.to_owned(), "type" => "prompt")
        .increment(usage.prompt_tokens);
    counter!(TOKENS, "model" => model.to_owned(), "type" => "completion")
        .increment(usage.completion_tokens);
    if let Some(cost) = usage.cost.filter(|c| c.is_finite() && *c >= 0.0) {
        // `metrics` counters are integers; a gauge that only ever grows carries the fractional
        // dollars, and `rate()`/`increase()` work on it the same way.
        gauge!(COST, "model" => model.to_owned()).increment(cost);
    }
}

pub const CACHE_EVICTIONS: &str = "openrouter_cache_evictions_total";
pub const CACHE_COALESCED: &str = "openrouter_cache_coalesced_total";
pub const CACHE_ENTRIES: &str = "openrouter_cache_entries";
pub const CACHE_BYTES: &str = "openrouter_cache_bytes";

/// `hit`, `miss` or `bypass`.
pub fn cache_result(result: &'static str) {
    counter!(CACHE, "result" => result).increment(1);
}

/// `size` (pushed out by the byte bound) or `expired` (past its TTL).
pub fn cache_eviction(cause: &'static str) {
    counter!(CACHE_EVICTIONS, "cause" => cause).increment(1);
}

pub fn cache_size(entries: u64, bytes: u64) {
    gauge!(CACHE_ENTRIES).set(entries as f64);
    gauge!(CACHE_BYTES).set(bytes as f64);
}

pub fn cache_coalesced() {
    counter!(CACHE_COALESCED).increment(1);
}
