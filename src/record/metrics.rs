//! Metric names, the recording helpers the pipeline calls, the bound on model label values, and
//! the Prometheus recorder the admin listener renders.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::handles::{self, Series};
use crate::config::Config;

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
pub const OVERHEAD: &str = "openrouter_proxy_overhead_seconds";
pub const CACHE_EVICTIONS: &str = "openrouter_cache_evictions_total";
pub const CACHE_COALESCED: &str = "openrouter_cache_coalesced_total";
pub const CACHE_ENTRIES: &str = "openrouter_cache_entries";
pub const CACHE_BYTES: &str = "openrouter_cache_bytes";
pub const KEY_UP: &str = "openrouter_upstream_key_up";

/// LLM calls take from milliseconds (cache hits, embeddings) to minutes (long generations).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// The proxy's own work per request is measured in microseconds; anything near the top bucket
/// is a problem worth seeing.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Several in-process servers (as in
/// tests) share it. Every histogram gets buckets: without them the exporter renders a summary.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(LATENCY.into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(TIME_TO_FIRST_BYTE.into()), LATENCY_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(OVERHEAD.into()), OVERHEAD_BUCKETS)
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
    metrics::describe_histogram!(
        OVERHEAD,
        metrics::Unit::Seconds,
        "Time the proxy itself spent before the first upstream request went out (reading and \
         parsing the body, routing, cache lookup), or until a cache hit was answered."
    );
    metrics::describe_counter!(
        TOKENS,
        "Tokens reported by the upstream's usage, by model and type."
    );
    metrics::describe_gauge!(
        COST,
        "Cost in USD reported by the upstream's usage, by model. A gauge that only grows: \
         counters here are integers."
    );
    metrics::describe_gauge!(ACTIVE, "Requests in flight.");
    metrics::describe_counter!(FALLBACKS, "Moves to the next model in a fallback chain.");
    metrics::describe_counter!(
        CACHE,
        "Cache lookups by route, result and the tier a hit came from."
    );
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
    metrics::describe_gauge!(
        KEY_UP,
        "1 while a key of an upstream's pool is in rotation, 0 while it is out (refused, out of \
         credit or rate limited)."
    );
    gauge!(ACTIVE).set(0.0);
}

/// Whether a key of an upstream's pool is in rotation; labelled by the key's name, never its value.
pub fn key_up(upstream: &str, key: &str, up: bool) {
    gauge!(KEY_UP, "upstream" => upstream.to_owned(), "key" => key.to_owned()).set(if up {
        1.0
    } else {
        0.0
    });
}

pub fn request_started() {
    handles::active().increment(1.0);
}

/// How many finished requests may leave their histogram samples waiting in the exporter.
const UPKEEP_EVERY: u64 = 256;

static FINISHED: AtomicU64 = AtomicU64::new(0);

/// The exporter keeps every histogram sample until it is moved into its buckets, which a render
/// of `/metrics` does: without this, memory grew with every request between two scrapes (about
/// 50 bytes per request, for ever when nothing scrapes). Every [`UPKEEP_EVERY`] requests the
/// samples are moved here.
fn upkeep_now_and_then() {
    if FINISHED.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
        handle().run_upkeep();
    }
}

/// Records a finished request (answered, failed, or abandoned by the client). `model` is a label
/// value already bounded by [`model_label`].
pub fn request_finished(
    series: &Series,
    status: u16,
    duration: Duration,
    first_byte: Option<Duration>,
) {
    handles::active().decrement(1.0);
    series.requests(status).increment(1);
    series.latency.record(duration.as_secs_f64());
    if let Some(first_byte) = first_byte {
        series.first_byte.record(first_byte.as_secs_f64());
    }
    upkeep_now_and_then();
}

/// The handles of one route and model label (bounded by [`model_label`]).
pub fn series(route: &str, model: &str) -> Arc<Series> {
    handles::series(route, model)
}

/// The proxy's own share of a request's time (see [`OVERHEAD`]'s description).
pub fn overhead(series: &Series, overhead: Duration) {
    series.overhead().record(overhead.as_secs_f64());
}

pub fn upstream_attempt(config: &Config, upstream: &str, model: &str, outcome: &'static str) {
    let model = model_label(config, model);
    handles::attempts(upstream, &model, outcome).increment(1);
}

/// Only models that already have a label are shown: a cool-down of a model counted under `other`
/// would say nothing about which one it is, and one `other` series cannot be 1 and 0 at once.
pub fn cooldown(upstream: &str, model: &str, cooling: bool) {
    if let Some(model) = admitted_label(model) {
        let upstream = upstream.to_owned();
        gauge!(COOLDOWN, "upstream" => upstream, "model" => model).set(if cooling {
            1.0
        } else {
            0.0
        });
    }
}

pub fn fallback(config: &Config, from: &str, to: &str, reason: &str) {
    let (from, to) = (model_label(config, from), model_label(config, to));
    counter!(FALLBACKS, "from" => from, "to" => to, "reason" => reason.to_owned()).increment(1);
}

/// Tokens and cost reported by the upstream for one answer, on the series of its model label.
pub fn usage(series: &Series, usage: &crate::sse::Usage) {
    let (prompt, completion) = series.tokens();
    prompt.increment(usage.prompt_tokens);
    completion.increment(usage.completion_tokens);
    if let Some(cost) = usage.cost.filter(|c| c.is_finite() && *c >= 0.0) {
        // `metrics` counters are integers; a gauge that only ever grows carries the fractional
        // dollars, and `rate()`/`increase()` work on it the same way.
        series.cost().increment(cost);
    }
}

/// The label value that stands for every model past the budget.
pub const OTHER_MODEL: &str = "other";

/// Longer names are never admitted: real model ids are far shorter, and each admitted name is kept
/// for the life of the process.
const MAX_MODEL_LABEL_LEN: usize = 128;

/// Model names seen as label values. Names a config routes to (`model`, `fallbacks`, exact
/// `match.model`) are admitted freely; any other name (clients choose them on pass-through
/// routes) is admitted while fewer than `[metrics] max_model_labels` such names have been, and
/// is `other` after that. Admission lasts for the life of the process, so a reload that lowers
/// the limit stops new names only.
#[derive(Default)]
struct ModelLabels {
    /// Looked up for every request: hashed with foldhash rather than SipHash. The set is bounded
    /// (`max_model_labels`), so a client choosing colliding names cannot make it slow.
    names: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// How many of `names` were admitted against the budget.
    unconfigured: usize,
}

fn model_labels() -> &'static RwLock<ModelLabels> {
    static LABELS: OnceLock<RwLock<ModelLabels>> = OnceLock::new();
    LABELS.get_or_init(RwLock::default)
}

/// `model` when it already is a label value; `None` when it would be `other` (or is unseen).
fn admitted_label(model: &str) -> Option<Arc<str>> {
    if model.is_empty() {
        return Some(constant_label(""));
    }
    let labels = model_labels()
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    labels.names.get(model).cloned()
}

/// `""` or [`OTHER_MODEL`] as a label value, made once.
fn constant_label(value: &'static str) -> Arc<str> {
    static EMPTY: OnceLock<Arc<str>> = OnceLock::new();
    static OTHER: OnceLock<Arc<str>> = OnceLock::new();
    let cell = if value.is_empty() { &EMPTY } else { &OTHER };
    cell.get_or_init(|| Arc::from(value)).clone()
}

/// The value a `model`, `from` or `to` label takes for `model` under `config`: the name itself,
/// or [`OTHER_MODEL`] once the budget for names the config does not mention is spent.
pub fn model_label(config: &Config, model: &str) -> Arc<str> {
    if let Some(label) = admitted_label(model) {
        return label;
    }
    if model.len() > MAX_MODEL_LABEL_LEN {
        return constant_label(OTHER_MODEL);
    }
    let configured = names_model(config, model);
    let mut labels = model_labels()
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(label) = labels.names.get(model) {
        return label.clone();
    }
    if !configured {
        if labels.unconfigured >= config.metrics.max_model_labels {
            return constant_label(OTHER_MODEL);
        }
        labels.unconfigured += 1;
    }
    let label: Arc<str> = Arc::from(model);
    labels.names.insert(label.clone());
    label
}

/// Whether `config` names `model` as a route's target, fallback or exact match.
fn names_model(config: &Config, model: &str) -> bool {
    config.routes.iter().any(|route| {
        route.model.as_deref() == Some(model)
            || route.fallbacks.iter().any(|m| m.model() == model)
            || route
                .matcher
                .model
                .as_deref()
                .is_some_and(|m| m == model && !m.contains(['*', '?']))
    })
}

/// `hit`, `miss` or `bypass`, on a route that caches.
/// `tier` is where a hit came from (`memory`, `redis`), `none` for a miss or a bypass.
pub fn cache_result(series: &Series, result: &'static str, tier: &'static str) {
    series.cache(result, tier).increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_models_share_a_budget_and_configured_ones_do_not() {
        let config = Config::parse(
            "[metrics]\nmax_model_labels = 1\n\
             [[routes]]\nname = \"a\"\nmatch = { model = \"unit-alias\" }\n\
             model = \"unit/target\"\nfallbacks = [\"unit/backup\"]\n\
             [[routes]]\nname = \"b\"\nmatch = { model = \"unit-glob/*\" }\n",
        )
        .unwrap();
        assert_eq!(&*model_label(&config, "unit-glob/first"), "unit-glob/first");
        assert_eq!(&*model_label(&config, "unit-glob/second"), OTHER_MODEL);
        // Admitted names stay admitted.
        assert_eq!(&*model_label(&config, "unit-glob/first"), "unit-glob/first");
        for named in ["unit/target", "unit/backup", "unit-alias"] {
            assert_eq!(&*model_label(&config, named), named);
        }
        // A glob names no model.
        assert_eq!(&*model_label(&config, "unit-glob/*"), OTHER_MODEL);
        assert_eq!(&*model_label(&config, ""), "");
        assert_eq!(
            admitted_label("unit/target").as_deref(),
            Some("unit/target")
        );
        assert_eq!(admitted_label("unit-glob/second"), None);
    }

    #[test]
    fn overlong_names_are_never_admitted() {
        let config = Config::default();
        let long = format!("unit-long/{}", "x".repeat(MAX_MODEL_LABEL_LEN));
        assert_eq!(&*model_label(&config, &long), OTHER_MODEL);
    }
}
