//! Traces: one span per request and one per upstream attempt, named and attributed by the
//! OpenTelemetry GenAI conventions, exported over OTLP/HTTP off the request path. Disabled (no
//! `[otel]`), every call here is a branch on `None`: no allocation, no lock, no clock read.
//!
//! In a request's life:
//! 1. [`Telemetry::start_request`] once the operation and requested model are known (the span
//!    starts at [`Inbound::received`]); the inbound `traceparent` is its parent.
//! 2. [`RequestSpan::attempt`] before each upstream request, then [`AttemptSpan::inject`] into
//!    its headers; [`AttemptSpan::fail`] when it fell back (or failed last), else
//!    [`AttemptSpan::end`] once its answer is chosen.
//! 3. [`RequestSpan::first_token`] when the first content byte goes to the client.
//! 4. [`RequestSpan::trace_id`] for the access-log line, then [`RequestSpan::finish`] with the
//!    request's [`Outcome`].
//! 5. At exit (or when a reload replaces the config), [`Telemetry::shutdown`].

mod answer;
mod attributes;
mod content;
mod export;
pub mod names;
mod settings;
mod span;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::InstrumentationScope;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub use settings::{ENDPOINT, RESOURCE_ATTRIBUTES, SERVICE_NAME_VAR, TRACES_ENDPOINT};
pub use span::{AttemptFacts, AttemptSpan, Inbound, Outcome, RequestSpan};

use crate::config::OtelConfig;
use export::Gate;
use settings::Settings;

/// Spans the collector did not accept (export failed or timed out, partial rejection, queue
/// full, ended after shutdown).
pub const SPANS_DROPPED: &str = "openrouter_otel_spans_dropped_total";

/// The tracing side of the proxy: cheap to clone, shared by every request of one config.
#[derive(Clone, Default)]
pub struct Telemetry(Option<Arc<Tracing>>);

/// What an enabled [`Telemetry`] shares with its spans.
struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    gate: Arc<Gate>,
    capture_content: bool,
    export_timeout: Duration,
}

impl Telemetry {
    /// Tracing per `config` (absent: disabled), with the `OTEL_*` variables of the process
    /// environment. Fails on an endpoint that is not an http(s) URL; nothing here connects, so a
    /// collector that is down fails nothing.
    pub fn new(config: &Option<OtelConfig>) -> Result<Telemetry, String> {
        Telemetry::with_env(config, |name| std::env::var(name).ok())
    }

    /// Like [`Telemetry::new`], with the variables read from `env` (tests pass an empty one).
    pub fn with_env(
        config: &Option<OtelConfig>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Telemetry, String> {
        let Some(config) = config else {
            return Ok(Telemetry::disabled());
        };
        let settings = Settings::resolve(config, &env)?;
        let gate = Arc::new(Gate::new(config.max_queue_size));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(export::processor(
                config,
                &settings.traces_url,
                gate.clone(),
            )?)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(settings.resource)
            .build();
        let scope = InstrumentationScope::builder(env!("CARGO_PKG_NAME"))
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        metrics::describe_counter!(
            SPANS_DROPPED,
            "Spans the trace collector did not accept: export failed or timed out, rejected, \
             or the export queue was full."
        );
        metrics::counter!(SPANS_DROPPED).increment(0);
        // The host only: a collector's path may carry a tenant token.
        let collector = settings.traces_url.parse::<http::Uri>().ok();
        let host = collector.as_ref().and_then(http::Uri::authority);
        tracing::info!(collector = ?host.map(|a| a.as_str()), "traces are exported over OTLP/HTTP");
        Ok(Telemetry(Some(Arc::new(Tracing {
            tracer: provider.tracer_with_scope(scope),
            provider,
            propagator: TraceContextPropagator::new(),
            gate,
            capture_content: config.capture_content,
            export_timeout: config.export_timeout,
        }))))
    }

    /// No tracing: every span is a no-op.
    pub fn disabled() -> Telemetry {
        Telemetry(None)
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// `[otel] export_timeout` (`None` when disabled): how long a planned exit waits for the
    /// last export.
    pub fn export_timeout(&self) -> Option<Duration> {
        self.0.as_ref().map(|t| t.export_timeout)
    }

    /// Spans of this instance the collector did not accept so far (the same events as
    /// [`SPANS_DROPPED`], which sums every instance of the process).
    pub fn spans_dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, |t| t.gate.drops.total())
    }

    /// Exports what is queued now, waiting for the collector's answer (tests; a planned exit
    /// uses [`Telemetry::shutdown`]).
    pub async fn flush(&self) -> Result<(), String> {
        self.blocking(|provider| provider.force_flush()).await
    }

    /// Exports what is queued and stops, waiting at most `deadline`. Spans still open or ending
    /// later are dropped and counted. The export thread finishes its work in the background past
    /// the deadline; nothing here blocks the runtime.
    pub async fn shutdown(&self, deadline: Duration) -> Result<(), String> {
        self.blocking(move |provider| provider.shutdown_with_timeout(deadline))
            .await
    }

    /// The SDK's flush and shutdown wait on its export thread; on a current-thread runtime
    /// that wait must not hold the runtime's only thread.
    async fn blocking(
        &self,
        call: impl FnOnce(&SdkTracerProvider) -> opentelemetry_sdk::error::OTelSdkResult
            + Send
            + 'static,
    ) -> Result<(), String> {
        let Some(tracing) = &self.0 else {
            return Ok(());
        };
        let provider = tracing.provider.clone();
        match tokio::task::spawn_blocking(move || call(&provider)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(format!("trace export task failed: {e}")),
        }
    }
}

impl Drop for Tracing {
    /// The SDK shuts its provider down, waiting on the export thread, when the last reference
    /// goes, and that may be a request's span on a runtime thread. Shutting it down here on a
    /// thread of its own makes that last drop free.
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let started = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || provider.shutdown_with_timeout(Duration::from_secs(5)));
        if let Err(error) = started {
            tracing::warn!(%error, "cannot stop the trace exporter in the background");
        }
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}
