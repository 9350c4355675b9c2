//! One record per request, written once when the answer ends, fails or is abandoned: the
//! request's metrics and its access-log line. Never a key, a header value or message content.

pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sse::Usage;

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
    pub attempts: usize,
    /// The status of the answer the proxy sent.
    pub status: u16,
    pub error: Option<&'static str>,
    pub usage: Option<Usage>,
    pub stream_error: Option<String>,
    /// `HIT`, `MISS` or `BYPASS` where the route caches.
    pub cache: Option<&'static str>,
    /// A cache hit that waited for an identical request's upstream answer: its time is that
    /// request's upstream time, not the proxy's overhead.
    pub coalesced: bool,
    /// The config the request runs on; it decides which model names are label values.
    config: Arc<Config>,
    /// From arrival until the first upstream request was sent.
    dispatched: Option<Duration>,
    first_byte: Option<Duration>,
    bytes: u64,
    pub(crate) outcome: Outcome,
}

impl RequestRecord {
    pub fn new(
        config: Arc<Config>,
        request_id: String,
        method: http::Method,
        path: String,
    ) -> RequestRecord {
        crate::record::metrics::request_started();
        RequestRecord {
            started: Instant::now(),
            request_id,
            method,
            path,
            route: Arc::from(crate::config::DEFAULT_ROUTE),
            caller: None,
            requested_model: None,
            served_model: None,
            attempts: 0,
            status: 0,
            error: None,
            usage: None,
            stream_error: None,
            cache: None,
            coalesced: false,
            config,
            dispatched: None,
            first_byte: None,
            bytes: 0,
            outcome: Outcome::Pending,
        }
    }

    /// Called just before an upstream request is sent; the first call ends the proxy's own share
    /// of the request's time.
    pub fn mark_dispatched(&mut self) {
        if self.dispatched.is_none() {
            self.dispatched = Some(self.started.elapsed());
        }
    }

    pub(crate) fn on_data(&mut self, len: usize) {
        if self.first_byte.is_none() && len > 0 {
            self.first_byte = Some(self.started.elapsed());
        }
        self.bytes += len as u64;
    }

    /// The proxy's own share of the request's time: until the first upstream request went out,
    /// or, for an answer from the cache, until it started going out. Requests that never reached
    /// either point (refused, or abandoned before) have none.
    fn overhead(&self) -> Option<Duration> {
        match self.cache {
            Some("HIT") if self.coalesced => None,
            Some("HIT") => self.first_byte,
            _ => self.dispatched,
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        // 499: the client closed the connection before the answer was complete (nginx's convention).
        let status = match self.outcome {
            Outcome::Pending => 499,
            _ => self.status,
        };
        let outcome = match self.outcome {
            Outcome::Pending => "client_closed",
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
        };
        let model = self
            .served_model
            .as_deref()
            .or(self.requested_model.as_deref())
            .unwrap_or("");
        let label = crate::record::metrics::model_label(&self.config, model);
        crate::record::metrics::request_finished(&self.route, &label, status, duration, self.first_byte);
        // A cache hit consumed nothing upstream: its replayed body carries the original usage,
        // which was counted when that answer was first served.
        if let Some(usage) = &self.usage {
            crate::record::metrics::usage(&label, usage);
        }
        let cache = match self.cache {
            Some("HIT") => Some("hit"),
            Some("MISS") => Some("miss"),
            Some("BYPASS") => Some("bypass"),
            _ => None,
        };
        if let Some(result) = cache {
            crate::record::metrics::cache_result(&self.route, result);
        }
        let overhead = self.overhead();
        if let Some(overhead) = overhead {
            crate::record::metrics::overhead(&self.route, overhead);
        }
        // Never the key, headers or bodies: only what routing and accounting decided.
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            route = %self.route,
            caller = self.caller.as_deref().unwrap_or(""),
            requested_model = self.requested_model.as_deref().unwrap_or(""),
            served_model = self.served_model.as_deref().unwrap_or(""),
            attempts = self.attempts,
            status,
            response_status = self.status,
            outcome,
            error = self.error.unwrap_or(""),
            stream_error = self.stream_error.as_deref().unwrap_or(""),
            ttfb_ms = self.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            duration_ms = duration.as_secs_f64() * 1000.0,
            overhead_ms = overhead.map(|d| d.as_secs_f64() * 1000.0),
            prompt_tokens = self.usage.map(|u| u.prompt_tokens),
            completion_tokens = self.usage.map(|u| u.completion_tokens),
            cost_usd = self.usage.and_then(|u| u.cost),
            cache = self.cache.unwrap_or(""),
            coalesced = self.coalesced,
            bytes = self.bytes,
            "request"
        );
    }
}
