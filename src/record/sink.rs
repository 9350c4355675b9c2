//! The one sink of a finished request: its record becomes the request's metrics, its
//! access-log line and the end of its trace span, exactly once, when the record is dropped.

use std::time::Duration;

use super::access::{self, AccessLine};
use super::metrics;
use super::{AttemptEvent, CacheResult, Outcome, RequestRecord};
use crate::telemetry;

impl RequestRecord {
    /// The proxy's own share of the request's time: until the first upstream request went out,
    /// or, for an answer from the cache, until it started going out. Requests that never reached
    /// either point (refused, or abandoned before) have none.
    fn overhead(&self) -> Option<Duration> {
        match self.cache {
            Some(CacheResult::Hit) if self.coalesced => None,
            Some(CacheResult::Hit) => self.first_byte,
            _ => self.dispatched,
        }
    }

    fn record_attempts(&self) {
        for event in &self.events {
            match event {
                AttemptEvent::Answered { upstream, model } => {
                    metrics::upstream_attempt(&self.config, upstream, model, "answered");
                }
                AttemptEvent::Failed {
                    upstream,
                    model,
                    reason,
                } => {
                    metrics::upstream_attempt(&self.config, upstream, model, reason);
                }
                AttemptEvent::Fallback { from, to, reason } => {
                    metrics::fallback(&self.config, from, to, reason);
                }
            }
        }
    }
}

impl RequestRecord {
    /// Ends the trace span with what the record knows; `status` is the one logged.
    fn end_span(&mut self, status: u16) {
        let span = std::mem::take(&mut self.span);
        if !span.is_recording() {
            // Unsampled (or tracing off): nothing to attribute, the span just ends.
            span.finish(&telemetry::Outcome::default());
            return;
        }
        let error_type = match self.outcome {
            Outcome::UpstreamFailed if self.stream_error.is_some() => Some("stream_broken"),
            _ => self.error,
        };
        span.finish(&telemetry::Outcome {
            status,
            provider: self.provider.as_deref(),
            upstream: self.upstream.as_deref(),
            served_model: self.served_model.as_deref(),
            input_tokens: self.usage.map(|u| u.prompt_tokens),
            output_tokens: self.usage.map(|u| u.completion_tokens),
            route: Some(&self.route),
            cache: self.cache.map(CacheResult::header),
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
            cost_usd: self.usage.and_then(|u| u.cost),
            error_type,
            ..telemetry::Outcome::default()
        });
    }

    /// The access-log line of the finished request. Never the key, headers or bodies: only what
    /// routing and accounting decided.
    fn access_line<'a>(
        &'a self,
        status: u16,
        outcome: &'static str,
        duration: Duration,
        overhead: Option<Duration>,
        trace_id: Option<&'a str>,
    ) -> AccessLine<'a> {
        let millis = |d: Duration| d.as_secs_f64() * 1000.0;
        AccessLine {
            request_id: &self.request_id,
            method: self.method.as_str(),
            path: &self.path,
            route: &self.route,
            caller: self.caller.as_deref().unwrap_or(""),
            requested_model: self.requested_model.as_deref().unwrap_or(""),
            served_model: self.served_model.as_deref().unwrap_or(""),
            upstream: self.upstream.as_deref().unwrap_or(""),
            key: self.key.as_deref().unwrap_or(""),
            attempts: self.attempts,
            status,
            response_status: self.status,
            outcome,
            error: self.error.unwrap_or(""),
            stream_error: self.stream_error.as_deref().unwrap_or(""),
            ttfb_ms: self.first_byte.map(millis),
            duration_ms: millis(duration),
            overhead_ms: overhead.map(millis),
            prompt_tokens: self.usage.map(|u| u.prompt_tokens),
            completion_tokens: self.usage.map(|u| u.completion_tokens),
            cost_usd: self.usage.and_then(|u| u.cost),
            cache: self.cache.map_or("", CacheResult::header),
            cache_tier: self.cache_tier.unwrap_or(""),
            coalesced: self.coalesced,
            batch_id: self.batch_id.as_deref().unwrap_or(""),
            bytes: self.bytes,
            trace_id,
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
        let label = metrics::model_label(&self.config, model);
        let series = metrics::series(&self.route, &label);
        self.record_attempts();
        metrics::request_finished(&series, status, duration, self.first_byte);
        // A cache hit consumed nothing upstream: its replayed body carries the original usage,
        // which was counted when that answer was first served.
        if let Some(usage) = &self.usage {
            metrics::usage(&series, usage);
        }
        let cost = self.usage.and_then(|u| u.cost);
        if let (Some(hook), Some(cost)) = (self.cost_hook.take(), cost) {
            hook(cost);
        }
        if let Some(result) = self.cache {
            metrics::cache_result(&series, result.label(), self.cache_tier.unwrap_or("none"));
        }
        let overhead = self.overhead();
        // No field without tracing.
        let trace_id = self.span.trace_id();
        if let Some(overhead) = overhead {
            metrics::overhead(&series, overhead);
        }
        if access::enabled() {
            self.access_line(status, outcome, duration, overhead, trace_id.as_deref())
                .write();
        }
        self.end_span(status);
    }
}
