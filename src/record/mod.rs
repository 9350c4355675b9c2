//! One record per request, filled in as the request goes and written once, when the answer
//! ends, fails or is abandoned, by one sink (see `sink`): the request's metrics, its
//! access-log line and its trace span. Never a key, a header value or message content (on the
//! span only with `[otel] capture_content`).

pub mod access;
mod handles;
pub mod metrics;
mod sink;

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sse::Usage;
use crate::telemetry::RequestSpan;

/// How a request ended, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running; if the record is dropped in this state, the client went away.
    Pending,
    Complete,
    UpstreamFailed,
}

/// One request's facts, for its access-log line and metrics. Written exactly once, on drop: when
/// the body ends, fails, or is dropped because the client went away.
pub struct RequestRecord {
    pub started: Instant,
    pub request_id: String,
    pub method: http::Method,
    pub path: String,
    pub route: Arc<str>,
    /// The inbound token's name, when tokens are configured.
    pub caller: Option<Arc<str>>,
    pub requested_model: Option<String>,
    pub served_model: Option<String>,
    /// The upstream that answered, and the name of the pool key it was sent with.
    pub upstream: Option<Arc<str>>,
    /// `gen_ai.provider.name` of the upstream that answered.
    pub provider: Option<Arc<str>>,
    pub key: Option<Arc<str>>,
    pub attempts: usize,
    /// The status of the answer the proxy sent.
    pub status: u16,
    pub error: Option<&'static str>,
    pub usage: Option<Usage>,
    pub stream_error: Option<String>,
    /// Where the route caches: how the cache answered.
    pub cache: Option<CacheResult>,
    /// The tier a hit came from (`memory`, `redis`).
    pub cache_tier: Option<&'static str>,
    /// A cache hit that waited for an identical request's upstream answer: its time is that
    /// request's upstream time, not the proxy's overhead.
    pub coalesced: bool,
    /// The batch a batch line belongs to (`None` for a client's request).
    pub batch_id: Option<String>,
    /// The request's trace span (a no-op without `[otel]`), ended with the record.
    pub span: RequestSpan,

    /// The config the request runs on; it decides which model names are label values.
    config: Arc<Config>,
    /// From arrival until the first upstream request was sent.
    dispatched: Option<Duration>,
    first_byte: Option<Duration>,
    bytes: u64,
    pub(crate) outcome: Outcome,
    /// Upstream attempts and moves along the chain, in order.
    events: Vec<AttemptEvent>,
    /// Called with the answer's cost when the request is recorded (budgets).
    cost_hook: Option<CostHook>,
}

/// What is done with an answer's cost.
pub type CostHook = Box<dyn FnOnce(f64) + Send>;

/// How the cache answered a request on a caching route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    /// The client asked the cache to stay out (`Cache-Control: no-store`), or the body has no
    /// canonical form.
    Bypass,
}

impl CacheResult {
    /// The `x-cache` header value.
    pub fn header(self) -> &'static str {
        match self {
            CacheResult::Hit => "HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Bypass => "BYPASS",
        }
    }

    /// The metric label and access-log value.
    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Bypass => "bypass",
        }
    }
}

/// Something that happened on the way along a request's attempts.
#[derive(Debug)]
enum AttemptEvent {
    Answered {
        upstream: Arc<str>,
        model: String,
    },
    Failed {
        upstream: Arc<str>,
        model: String,
        reason: &'static str,
    },
    Fallback {
        from: String,
        to: String,
        reason: &'static str,
    },
}

impl RequestRecord {
    pub fn new(
        config: Arc<Config>,
        request_id: String,
        method: http::Method,
        path: String,
    ) -> RequestRecord {
        static DEFAULT_ROUTE: LazyLock<Arc<str>> =
            LazyLock::new(|| Arc::from(crate::config::DEFAULT_ROUTE));
        crate::record::metrics::request_started();
        RequestRecord {
            started: Instant::now(),
            request_id,
            method,
            path,
            route: DEFAULT_ROUTE.clone(),
            caller: None,
            requested_model: None,
            served_model: None,
            upstream: None,
            provider: None,
            key: None,
            attempts: 0,
            status: 0,
            error: None,
            usage: None,
            stream_error: None,
            cache: None,
            cache_tier: None,
            coalesced: false,
            batch_id: None,
            span: RequestSpan::default(),
            config,
            dispatched: None,
            first_byte: None,
            bytes: 0,
            outcome: Outcome::Pending,
            events: Vec::new(),
            cost_hook: None,
        }
    }

    /// Calls `hook` with the answer's cost (`usage.cost`) when the request is recorded.
    pub fn on_cost(&mut self, hook: CostHook) {
        self.cost_hook = Some(hook);
    }

    /// The request waits for an identical request in flight; counted at once, so that waiting
    /// requests show while they wait.
    pub fn waits_for_fill(&mut self) {
        metrics::cache_coalesced();
    }

    /// An attempt on `model` at `upstream` answered.
    pub fn attempt_answered(&mut self, upstream: &Arc<str>, model: &str) {
        self.events.push(AttemptEvent::Answered {
            upstream: upstream.clone(),
            model: model.to_owned(),
        });
    }

    /// An attempt on `model` at `upstream` failed for `reason` (a low-cardinality label).
    pub fn attempt_failed(&mut self, upstream: &Arc<str>, model: &str, reason: &'static str) {
        self.events.push(AttemptEvent::Failed {
            upstream: upstream.clone(),
            model: model.to_owned(),
            reason,
        });
    }

    /// The chain moved on from `from` to `to` for `reason`.
    pub fn fallback(&mut self, from: &str, to: &str, reason: &'static str) {
        self.events.push(AttemptEvent::Fallback {
            from: from.to_owned(),
            to: to.to_owned(),
            reason,
        });
    }

    /// Called just before an upstream request is sent; the first call ends the proxy's own share
    /// of the request's time.
    pub fn mark_dispatched(&mut self) {
        if self.dispatched.is_none() {
            self.dispatched = Some(self.started.elapsed());
        }
    }

    /// `bytes` go to the client: the first of them is the first token.
    pub(crate) fn on_data(&mut self, bytes: &[u8]) {
        if self.first_byte.is_none() && !bytes.is_empty() {
            self.first_byte = Some(self.started.elapsed());
            self.span.first_token();
        }
        self.span.observe(bytes);
        self.bytes += bytes.len() as u64;
    }
}
