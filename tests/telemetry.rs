//! Traces as a collector receives them: a real OTLP/HTTP receiver on loopback decodes what the
//! telemetry module exports for requests driven through its API (the proxy's pipeline calls the
//! same API): the request span and its parent from `traceparent`, attempt spans with the
//! failure reason, the `traceparent` sent upstream, parent-based sampling, content only on
//! request, and a collector that is down or hangs costing the caller nothing, every lost span
//! counted.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use openrouter_proxy::config::OtelConfig;
use openrouter_proxy::telemetry::{
    AttemptFacts, AttemptSpan, Inbound, Outcome, RequestSpan, Telemetry,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde_json::{json, Value};

use common::otlp::*;
use common::{MockUpstream, Reply, PATIENCE};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Exports happen on `flush`, on a full batch or at shutdown, never on a timer during a test.
fn config(endpoint: String) -> OtelConfig {
    OtelConfig {
        endpoint,
        service_name: "proxy-under-test".into(),
        export_interval: Duration::from_secs(3600),
        export_timeout: Duration::from_secs(5),
        ..OtelConfig::default()
    }
}

/// Telemetry with no `OTEL_*` variables, whatever the environment running the tests holds.
fn telemetry(config: OtelConfig) -> Telemetry {
    Telemetry::with_env(&Some(config), |_| None).unwrap()
}

/// The head of a chat request as the proxy receives it.
struct Head {
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    received: Instant,
}

impl Head {
    fn new(traceparent: Option<&str>) -> Head {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        if let Some(traceparent) = traceparent {
            headers.insert("traceparent", traceparent.parse().unwrap());
            headers.insert("tracestate", HeaderValue::from_static("vendor=abc"));
        }
        Head {
            headers,
            method: Method::POST,
            uri: Uri::from_static("/v1/chat/completions"),
            received: Instant::now(),
        }
    }

    fn inbound(&self) -> Inbound<'_> {
        Inbound {
            headers: &self.headers,
            method: &self.method,
            uri: &self.uri,
            version: Version::HTTP_11,
            received: self.received,
            operation: "chat",
            requested_model: Some("smart"),
            stream: true,
        }
    }
}

fn attempt(span: &mut RequestSpan, model: &str) -> AttemptSpan {
    span.attempt(&AttemptFacts {
        upstream: "openrouter",
        provider: "openrouter",
        model,
        uri: &Uri::from_static("https://openrouter.ai/api/v1/chat/completions"),
    })
}

const SERVED: Outcome<'static> = Outcome {
    status: 200,
    provider: Some("openrouter"),
    upstream: Some("openrouter"),
    served_model: Some("anthropic/claude-sonnet"),
    response_model: Some("anthropic/claude-sonnet-4"),
    response_id: Some("gen-123"),
    finish_reasons: &["stop"],
    input_tokens: Some(12),
    output_tokens: Some(34),
    route: Some("smart"),
    cache: Some("MISS"),
    attempts: 2,
    cost_usd: Some(0.0021),
    error_type: None,
};

/// One streamed chat with a fallback, the way the pipeline reports it: the first attempt fails
/// with a 503, the second answers. Returns the `traceparent` sent with the second attempt.
fn chat_with_fallback(telemetry: &Telemetry, head: &Head) -> Option<HeaderValue> {
    let mut span = telemetry.start_request(&head.inbound());
    let mut first = attempt(&mut span, "openai/gpt-4o");
    first.status(503);
    first.fail("status_503");
    let mut second = attempt(&mut span, "anthropic/claude-sonnet");
    let mut upstream_headers = head.headers.clone();
    second.inject(&mut upstream_headers);
    second.status(200);
    span.first_token();
    second.end();
    span.finish(&SERVED);
    upstream_headers.get("traceparent").cloned()
}

#[tokio::test]
async fn a_chat_with_a_fallback_is_one_trace_under_the_callers_span() {
    let collector = collector().await;
    let telemetry = telemetry(config(endpoint_of(&collector)));
    let head = Head::new(Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")));

    let sent_upstream = chat_with_fallback(&telemetry, &head).unwrap();
    telemetry.flush().await.unwrap();
    let spans = wait_spans(&collector, 3).await;
    let request = spans.iter().find(|s| s.name == "chat smart").unwrap();
    let failed = spans
        .iter()
        .find(|s| s.name == "chat openai/gpt-4o")
        .unwrap();
    let answered = spans
        .iter()
        .find(|s| s.name == "chat anthropic/claude-sonnet")
        .unwrap();

    assert_eq!(request.trace_id, TRACE);
    assert_eq!(request.parent_span_id, CALLER_SPAN);
    assert_eq!(request.kind, SpanKind::Server as i32);
    let expected = json!({
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openrouter",
        "gen_ai.request.model": "smart",
        "gen_ai.request.stream": true,
        "gen_ai.response.model": "anthropic/claude-sonnet-4",
        "gen_ai.response.id": "gen-123",
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 34,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "url.path": "/v1/chat/completions",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "server.address": "127.0.0.1",
        "server.port": 8080,
        "openrouter.route": "smart",
        "openrouter.cache.result": "MISS",
        "openrouter.attempts": 2,
        "openrouter.upstream": "openrouter",
        "openrouter.served_model": "anthropic/claude-sonnet",
        "openrouter.cost_usd": 0.0021,
    });
    for (key, value) in expected.as_object().unwrap() {
        assert_eq!(request.attr(key), Some(value), "{key} on {request:#?}");
    }
    assert_eq!(request.events, ["first_token"]);
    let ttft = request.attr("gen_ai.response.time_to_first_chunk").unwrap();
    assert!(ttft.as_f64().unwrap() >= 0.0);
    assert_eq!(request.attr("error.type"), None);
    assert_eq!(request.status_code, StatusCode::Unset as i32);
    assert_eq!(
        request.resource.get("service.name"),
        Some(&json!("proxy-under-test"))
    );

    for (attempt, number, model) in [
        (failed, 1, "openai/gpt-4o"),
        (answered, 2, "anthropic/claude-sonnet"),
    ] {
        assert_eq!(attempt.trace_id, TRACE);
        assert_eq!(attempt.parent_span_id, request.span_id);
        assert_eq!(attempt.kind, SpanKind::Client as i32);
        assert_eq!(attempt.int("openrouter.attempt"), Some(number));
        assert_eq!(attempt.str("gen_ai.request.model"), Some(model));
        assert_eq!(attempt.str("gen_ai.provider.name"), Some("openrouter"));
        assert_eq!(attempt.str("gen_ai.operation.name"), Some("chat"));
        assert_eq!(attempt.str("server.address"), Some("openrouter.ai"));
        assert_eq!(attempt.int("server.port"), Some(443));
    }
    assert_eq!(failed.str("error.type"), Some("status_503"));
    assert_eq!(failed.int("http.response.status_code"), Some(503));
    assert_eq!(failed.status_code, StatusCode::Error as i32);
    assert_eq!(failed.status_message, "status_503");
    assert_eq!(answered.attr("error.type"), None);
    assert_eq!(answered.status_code, StatusCode::Unset as i32);

    assert_eq!(
        sent_upstream.to_str().unwrap(),
        format!("00-{TRACE}-{}-01", answered.span_id)
    );
}

#[tokio::test]
async fn the_upstream_gets_the_attempts_context_and_the_callers_tracestate() {
    let collector = collector().await;
    let telemetry = telemetry(config(endpoint_of(&collector)));
    let head = Head::new(Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")));
    let mut span = telemetry.start_request(&head.inbound());
    assert_eq!(span.trace_id().as_deref(), Some(TRACE));
    let attempt = attempt(&mut span, "openai/gpt-4o");
    let mut headers = head.headers.clone();
    attempt.inject(&mut headers);
    assert_eq!(headers.get("traceparent"), attempt.traceparent().as_ref());
    assert_eq!(headers["tracestate"], "vendor=abc");
    let traceparent = headers["traceparent"].to_str().unwrap().to_owned();
    assert!(traceparent.starts_with(&format!("00-{TRACE}-")));
    assert!(!traceparent.contains(CALLER_SPAN), "{traceparent}");
    attempt.end();
    span.finish(&SERVED);
}

#[tokio::test]
async fn sampling_follows_the_parent_and_the_ratio_only_decides_new_traces() {
    let collector = collector().await;
    let telemetry = telemetry(OtelConfig {
        sample_ratio: 0.0,
        ..config(endpoint_of(&collector))
    });
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";

    // Not sampled by the caller: nothing recorded, but the trace still travels upstream.
    let head = Head::new(Some(&format!("00-{unsampled_trace}-{CALLER_SPAN}-00")));
    let mut span = telemetry.start_request(&head.inbound());
    assert_eq!(span.trace_id().as_deref(), Some(unsampled_trace));
    let quiet = attempt(&mut span, "openai/gpt-4o");
    let traceparent = quiet.traceparent().unwrap();
    let traceparent = traceparent.to_str().unwrap();
    assert!(traceparent.starts_with(&format!("00-{unsampled_trace}-")));
    assert!(traceparent.ends_with("-00"), "{traceparent}");
    quiet.end();
    span.finish(&SERVED);

    // No parent and a ratio of 0: a trace id for the log, nothing recorded.
    let head = Head::new(None);
    let span = telemetry.start_request(&head.inbound());
    let own_trace = span.trace_id().unwrap();
    assert_eq!(own_trace.len(), 32);
    span.finish(&SERVED);

    // Sampled by the caller: recorded whatever the ratio.
    let head = Head::new(Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")));
    chat_with_fallback(&telemetry, &head).unwrap();

    telemetry.flush().await.unwrap();
    let spans = wait_spans(&collector, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == TRACE), "{spans:#?}");
    assert_eq!(telemetry.spans_dropped(), 0);
}

#[tokio::test]
async fn content_is_exported_only_when_capture_content_is_on() {
    const PROMPT: &str = "my card number is 4111";
    const ANSWER: &str = "noted, 4111";
    let body = json!({"model": "smart", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": PROMPT},
    ]})
    .to_string();
    let head = Head::new(Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")));
    let record = |telemetry: &Telemetry| {
        let mut span = telemetry.start_request(&head.inbound());
        span.record_input(body.as_bytes());
        span.record_output(ANSWER, "stop");
        let captures = span.captures_content();
        span.finish(&SERVED);
        captures
    };

    let collector_off = collector().await;
    let off = telemetry(config(endpoint_of(&collector_off)));
    assert!(!record(&off));
    off.flush().await.unwrap();
    let spans = wait_spans(&collector_off, 1).await;
    for key in [
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.system_instructions",
    ] {
        assert_eq!(spans[0].attr(key), None, "{key}");
    }
    for request in collector_off.requests() {
        let bytes = String::from_utf8_lossy(&request.body).into_owned();
        assert!(!bytes.contains("4111") && !bytes.contains("be brief"));
    }

    let collector_on = collector().await;
    let on = telemetry(OtelConfig {
        capture_content: true,
        ..config(endpoint_of(&collector_on))
    });
    assert!(record(&on));
    on.flush().await.unwrap();
    let spans = wait_spans(&collector_on, 1).await;
    let parsed = |key: &str| -> Value { serde_json::from_str(spans[0].str(key).unwrap()).unwrap() };
    assert_eq!(
        parsed("gen_ai.input.messages"),
        json!([
            {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
            {"role": "user", "parts": [{"type": "text", "content": PROMPT}]},
        ])
    );
    assert_eq!(
        parsed("gen_ai.output.messages"),
        json!([{"role": "assistant", "parts": [{"type": "text", "content": ANSWER}], "finish_reason": "stop"}])
    );
}

/// `requests` chats with a fallback (three spans each). Returns how long the caller spent.
fn drive(telemetry: &Telemetry, requests: usize) -> Duration {
    let head = Head::new(Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")));
    let started = Instant::now();
    for _ in 0..requests {
        chat_with_fallback(telemetry, &head).unwrap();
    }
    started.elapsed()
}

/// Far above what 1,000 requests' spans cost (milliseconds), far below a caller waiting on an
/// export (which would never end with a hanging collector).
const CALLER_BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_collector_that_is_down_costs_the_caller_nothing_and_every_span_is_counted() {
    let metric_before = spans_dropped_metric();
    let telemetry = telemetry(OtelConfig {
        export_timeout: Duration::from_millis(300),
        ..config(endpoint_nobody_listens_on())
    });
    let spent = drive(&telemetry, 1000);
    assert!(spent < CALLER_BOUND, "the caller spent {spent:?}");
    telemetry.shutdown(PATIENCE).await.unwrap();
    assert_eq!(telemetry.spans_dropped(), 3000);
    assert!(spans_dropped_metric() >= metric_before + 3000.0);
}

#[tokio::test]
async fn a_collector_that_hangs_costs_the_caller_nothing_and_every_span_is_counted() {
    let collector = MockUpstream::start(|_| Reply::Hang).await;
    let telemetry = telemetry(OtelConfig {
        max_queue_size: 1024,
        max_export_batch_size: 512,
        export_timeout: Duration::from_secs(1),
        ..config(endpoint_of(&collector))
    });
    // A full batch goes out at once; the collector holds it without an answer.
    drive(&telemetry, 200);
    collector.wait_requests(1).await;

    let spent = drive(&telemetry, 1000);
    assert!(spent < CALLER_BOUND, "the caller spent {spent:?}");
    telemetry.shutdown(PATIENCE).await.unwrap();
    assert_eq!(telemetry.spans_dropped(), 3600);
    for request in collector.requests() {
        assert!(!decode(&request).is_empty());
    }
}

#[tokio::test]
async fn spans_the_collector_rejects_are_counted() {
    let collector = MockUpstream::start(|_| otlp_partially_rejected(2)).await;
    let telemetry = telemetry(config(endpoint_of(&collector)));
    chat_with_fallback(&telemetry, &Head::new(None));
    telemetry.flush().await.unwrap();
    assert_eq!(wait_spans(&collector, 3).await.len(), 3);
    assert_eq!(telemetry.spans_dropped(), 2);
}

#[tokio::test]
async fn spans_ending_after_shutdown_are_counted() {
    let collector = collector().await;
    let telemetry = telemetry(config(endpoint_of(&collector)));
    let head = Head::new(None);
    let mut span = telemetry.start_request(&head.inbound());
    let open_attempt = attempt(&mut span, "openai/gpt-4o");
    telemetry.shutdown(PATIENCE).await.unwrap();
    open_attempt.fail("timeout");
    span.finish(&SERVED);
    assert_eq!(telemetry.spans_dropped(), 2);
    assert!(received_spans(&collector).is_empty());
}

#[tokio::test]
async fn disabled_tracing_is_a_no_op_that_leaves_headers_alone() {
    let telemetry = Telemetry::with_env(&None, |_| Some("http://127.0.0.1:9".into())).unwrap();
    assert!(!telemetry.is_enabled());
    let head = Head::new(Some(&format!("00-{TRACE}-{CALLER_SPAN}-01")));
    let mut span = telemetry.start_request(&head.inbound());
    assert_eq!(span.trace_id(), None);
    assert!(!span.captures_content());
    let attempt = attempt(&mut span, "openai/gpt-4o");
    let mut headers = head.headers.clone();
    attempt.inject(&mut headers);
    assert_eq!(headers, head.headers);
    assert_eq!(attempt.traceparent(), None);
    attempt.end();
    span.first_token();
    span.finish(&SERVED);
    // Nothing but a null pointer per request and per attempt.
    assert_eq!(
        std::mem::size_of::<RequestSpan>(),
        std::mem::size_of::<usize>()
    );
    assert_eq!(
        std::mem::size_of::<AttemptSpan>(),
        std::mem::size_of::<usize>()
    );
    assert_eq!(telemetry.spans_dropped(), 0);
    telemetry.shutdown(PATIENCE).await.unwrap();
}
