//! The spans of one request: a SERVER span for the request (named `{operation} {model}`, with
//! the GenAI, HTTP and proxy attributes) and a CLIENT span per upstream attempt, whose context
//! goes upstream in `traceparent`. Disabled, each is `None` and every method returns at once.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::trace::Span as SdkSpan;

use super::attributes::{attempt_attributes, request_attributes};
use super::names::{self as semconv, *};
use super::{answer, content, Tracing};

/// The request as it arrived, for [`super::Telemetry::start_request`].
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// Its headers: `traceparent` and `tracestate` (the parent) and `host`.
    pub headers: &'a HeaderMap,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    /// When it arrived; the span starts here.
    pub received: Instant,
    /// `gen_ai.operation.name`: `chat`, `text_completion`, `embeddings`, or the API's own name.
    pub operation: &'a str,
    /// The model the client asked for (a route's alias such as `smart`), where there is one.
    pub requested_model: Option<&'a str>,
    /// Whether the client asked for a streamed answer.
    pub stream: bool,
}

/// One upstream attempt, for [`RequestSpan::attempt`].
#[derive(Debug, Clone, Copy)]
pub struct AttemptFacts<'a> {
    /// The upstream's name in the config.
    pub upstream: &'a str,
    /// `gen_ai.provider.name`, e.g. `openrouter`, `openai`, `anthropic`.
    pub provider: &'a str,
    /// The model sent upstream.
    pub model: &'a str,
    /// Where the request goes (`server.address`, `server.port`).
    pub uri: &'a Uri,
}

/// How a request ended, for [`RequestSpan::finish`]. Everything but `status` is optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome<'a> {
    /// The status the client got.
    pub status: u16,
    /// `gen_ai.provider.name` of the upstream that answered.
    pub provider: Option<&'a str>,
    pub upstream: Option<&'a str>,
    /// The model the answering attempt asked for.
    pub served_model: Option<&'a str>,
    /// The model the upstream says answered.
    pub response_model: Option<&'a str>,
    pub response_id: Option<&'a str>,
    pub finish_reasons: &'a [&'a str],
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub route: Option<&'a str>,
    /// `HIT`, `MISS` or `BYPASS`.
    pub cache: Option<&'a str>,
    pub attempts: u32,
    pub cost_usd: Option<f64>,
    /// A low-cardinality name of what went wrong, when the request failed (`error.type`).
    pub error_type: Option<&'a str>,
}

/// The span of one request.
#[derive(Debug, Default)]
pub struct RequestSpan(Option<Box<LiveRequest>>);

#[derive(Debug)]
struct LiveRequest {
    span: Live,
    operation: String,
    received: Instant,
    attempts: u32,
    first_token: bool,
    /// What the answer said of itself so far (sampled requests only).
    answer: answer::Facts,
}

/// The span of one upstream attempt.
#[derive(Debug, Default)]
pub struct AttemptSpan(Option<Box<Live>>);

/// A started SDK span and the telemetry it reports to. Ends on drop if not ended before, so a
/// request cancelled mid-way still closes its spans.
struct Live {
    span: SdkSpan,
    tracing: Arc<Tracing>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("context", self.span.span_context())
            .finish()
    }
}

impl Live {
    fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.span.set_attribute(KeyValue::new(key, value));
    }

    fn set_some(&mut self, key: &'static str, value: Option<impl Into<Value>>) {
        if let Some(value) = value {
            self.set(key, value);
        }
    }

    fn end(&mut self) {
        if self.span.is_recording() && self.tracing.gate.is_closed() {
            self.tracing.gate.drops.add(1);
        }
        self.span.end();
    }

    /// A context whose active span is this one, as the parent of children and of upstream.
    fn context(&self) -> Context {
        Context::new().with_remote_span_context(self.span.span_context().clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.span.is_recording() {
            self.end();
        }
    }
}

impl super::Telemetry {
    /// Starts the span of a request. The inbound `traceparent`/`tracestate` is its parent, and
    /// decides sampling when present (parent-based); the span is named `{operation} {model}`.
    pub fn start_request(&self, inbound: &Inbound<'_>) -> RequestSpan {
        let Some(tracing) = &self.0 else {
            return RequestSpan(None);
        };
        let parent = tracing
            .propagator
            .extract_with_context(&Context::new(), &HeaderExtractor(inbound.headers));
        let name = match inbound.requested_model {
            Some(model) => format!("{} {model}", inbound.operation),
            None => inbound.operation.to_owned(),
        };
        let started = SystemTime::now()
            .checked_sub(inbound.received.elapsed())
            .unwrap_or_else(SystemTime::now);
        let mut span = tracing
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .start_with_context(&tracing.tracer, &parent);
        // Our samplers read no attributes; a span not sampled never builds them.
        if span.is_recording() {
            span.set_attributes(request_attributes(inbound));
        }
        RequestSpan(Some(Box::new(LiveRequest {
            span: Live {
                span,
                tracing: tracing.clone(),
            },
            operation: inbound.operation.to_owned(),
            received: inbound.received,
            attempts: 0,
            first_token: false,
            answer: answer::Facts::default(),
        })))
    }
}

impl RequestSpan {
    /// The trace this request belongs to (32 hex digits), for the access log; `None` when
    /// tracing is off. Present also when the request is not sampled.
    pub fn trace_id(&self) -> Option<String> {
        let live = self.0.as_ref()?;
        let context = live.span.span.span_context();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// Whether prompts and answers are wanted ([`RequestSpan::record_input`] and
    /// [`RequestSpan::record_output`] do nothing otherwise), so the pipeline can skip gathering
    /// them.
    pub fn captures_content(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|live| live.span.tracing.capture_content && live.span.span.is_recording())
    }

    /// Records the prompt of `body` (the request JSON) when `capture_content` is on.
    pub fn record_input(&mut self, body: &[u8]) {
        if !self.captures_content() {
            return;
        }
        let Some(live) = self.0.as_mut() else { return };
        let input = content::input(body);
        live.span
            .set_some(semconv::GEN_AI_INPUT_MESSAGES, input.messages);
        live.span
            .set_some(semconv::GEN_AI_SYSTEM_INSTRUCTIONS, input.system);
    }

    /// Records the answer's text when `capture_content` is on.
    pub fn record_output(&mut self, text: &str, finish_reason: &str) {
        if !self.captures_content() {
            return;
        }
        if let Some(live) = self.0.as_mut() {
            let reason = match (finish_reason, live.answer.finish_reasons.first()) {
                ("", Some(found)) => found.as_str(),
                (given, _) => given,
            };
            let output = content::output(text, reason);
            live.span.set(semconv::GEN_AI_OUTPUT_MESSAGES, output);
        }
    }

    /// Whether this request is traced and sampled: its attributes are wanted.
    pub fn is_recording(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|live| live.span.span.is_recording())
    }

    /// Looks at the next bytes going to the client for the answer's id, model and finish
    /// reasons (see `answer`); nothing unless the span records.
    pub fn observe(&mut self, bytes: &[u8]) {
        if let Some(live) = self.0.as_mut().filter(|l| l.span.span.is_recording()) {
            live.answer.scan(bytes);
        }
    }

    /// Records the text of a complete JSON answer (`bytes`) when `capture_content` is on.
    pub fn record_output_json(&mut self, bytes: &[u8]) {
        if self.captures_content() {
            if let Some(text) = content::output_text(bytes) {
                self.record_output(&text, "");
            }
        }
    }

    /// Marks the first content byte reaching the client: an event, and
    /// `gen_ai.response.time_to_first_chunk` in seconds. Later calls do nothing.
    pub fn first_token(&mut self) {
        let Some(live) = self.0.as_mut() else { return };
        if std::mem::replace(&mut live.first_token, true) {
            return;
        }
        let seconds = live.received.elapsed().as_secs_f64();
        live.span.span.add_event(FIRST_TOKEN, Vec::new());
        live.span
            .set(semconv::GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, seconds);
    }

    /// Starts the span of the next upstream attempt, a child of this request, named
    /// `{operation} {model}`. Its context goes upstream with [`AttemptSpan::inject`].
    pub fn attempt(&mut self, facts: &AttemptFacts<'_>) -> AttemptSpan {
        let Some(live) = self.0.as_mut() else {
            return AttemptSpan(None);
        };
        live.attempts += 1;
        let tracing = &live.span.tracing;
        let mut span = tracing
            .tracer
            .span_builder(format!("{} {}", live.operation, facts.model))
            .with_kind(SpanKind::Client)
            .start_with_context(&tracing.tracer, &live.span.context());
        if span.is_recording() {
            span.set_attributes(attempt_attributes(&live.operation, live.attempts, facts));
        }
        AttemptSpan(Some(Box::new(Live {
            span,
            tracing: tracing.clone(),
        })))
    }

    /// Ends the span with the request's outcome. The span's status is an error for 5xx answers
    /// and for failures named in `error_type`, except the client's own (4xx), which keep only
    /// `error.type`.
    pub fn finish(mut self, outcome: &Outcome<'_>) {
        let Some(live) = self.0.as_mut() else { return };
        if !live.span.span.is_recording() {
            live.span.end();
            return;
        }
        let answer = std::mem::take(&mut live.answer);
        let span = &mut live.span;
        span.set(
            semconv::HTTP_RESPONSE_STATUS_CODE,
            i64::from(outcome.status),
        );
        span.set_some(semconv::GEN_AI_PROVIDER_NAME, owned(outcome.provider));
        let response_model = owned(outcome.response_model).or(answer.model);
        span.set_some(semconv::GEN_AI_RESPONSE_MODEL, response_model);
        let response_id = owned(outcome.response_id).or(answer.id);
        span.set_some(semconv::GEN_AI_RESPONSE_ID, response_id);
        let reasons: Vec<StringValue> = if outcome.finish_reasons.is_empty() {
            answer
                .finish_reasons
                .into_iter()
                .map(StringValue::from)
                .collect()
        } else {
            outcome
                .finish_reasons
                .iter()
                .map(|r| StringValue::from((*r).to_owned()))
                .collect()
        };
        if !reasons.is_empty() {
            span.set(
                semconv::GEN_AI_RESPONSE_FINISH_REASONS,
                Value::Array(Array::String(reasons)),
            );
        }
        span.set_some(
            semconv::GEN_AI_USAGE_INPUT_TOKENS,
            outcome.input_tokens.map(count),
        );
        span.set_some(
            semconv::GEN_AI_USAGE_OUTPUT_TOKENS,
            outcome.output_tokens.map(count),
        );
        span.set_some(ROUTE, owned(outcome.route));
        span.set_some(CACHE_RESULT, owned(outcome.cache));
        span.set(ATTEMPTS, i64::from(outcome.attempts));
        span.set_some(UPSTREAM, owned(outcome.upstream));
        span.set_some(SERVED_MODEL, owned(outcome.served_model));
        span.set_some(COST, outcome.cost_usd);
        let error = match outcome.error_type {
            Some(kind) => Some(kind.to_owned()),
            None if outcome.status >= 500 => Some(outcome.status.to_string()),
            None => None,
        };
        if let Some(error) = error {
            span.set(semconv::ERROR_TYPE, error.clone());
            // The HTTP conventions leave a server span's status unset for the client's own
            // errors (4xx): they are not the service's failures.
            if !(400..500).contains(&outcome.status) {
                span.span.set_status(Status::error(error));
            }
        }
        span.end();
    }
}

fn owned(value: Option<&str>) -> Option<String> {
    value.map(str::to_owned)
}

/// Token counts are i64 in OpenTelemetry; no real count comes near the difference.
fn count(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

impl AttemptSpan {
    /// Writes this attempt's context into the upstream request's headers (`traceparent`, and
    /// `tracestate` when the trace has one), replacing what the client sent. Disabled: leaves
    /// the headers as they are.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(live) = &self.0 {
            let context = live.context();
            live.tracing
                .propagator
                .inject_context(&context, &mut HeaderInjector(headers));
        }
    }

    /// Whether this is a span at all (tracing is on), sampled or not.
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// The `traceparent` [`AttemptSpan::inject`] writes.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        let mut headers = HeaderMap::new();
        self.inject(&mut headers);
        headers.remove("traceparent")
    }

    /// Records the upstream's answer status.
    pub fn status(&mut self, status: u16) {
        if let Some(live) = self.0.as_mut() {
            live.set(semconv::HTTP_RESPONSE_STATUS_CODE, i64::from(status));
        }
    }

    /// Ends the attempt as failed: `reason` (low-cardinality: `timeout`, `connect`, `status_503`,
    /// ...) becomes `error.type` and the span's error status.
    pub fn fail(mut self, reason: &str) {
        if let Some(live) = self.0.as_mut() {
            live.set(semconv::ERROR_TYPE, reason.to_owned());
            live.span.set_status(Status::error(reason.to_owned()));
            live.end();
        }
    }

    /// Ends the attempt as the one that answered.
    pub fn end(mut self) {
        if let Some(live) = self.0.as_mut() {
            live.end();
        }
    }
}
