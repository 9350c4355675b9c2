//! Traces from the real binary: a scripted upstream pair on loopback, a real OTLP/HTTP receiver
//! decoding the protobuf the proxy exports, and the proxy's own access log. One streamed chat
//! with a fallback is one trace under the caller's span; the upstream sees the attempt's span as
//! its parent; content is exported only when asked for; a collector that is down or holds every
//! export costs no request anything and every lost span is counted; without `[otel]` the proxy
//! adds no trace header.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};

use common::otlp::*;
use common::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

/// The route "smart": `primary/model` on the default upstream, then `backup/model` on
/// `[upstreams.backup]`; `otel` is the `[otel]` table's body, or `None` for no table.
fn config(primary: &MockUpstream, backup: &MockUpstream, otel: Option<&str>) -> PathBuf {
    let key = temp_file("key", TEST_KEY);
    let otel = otel.map_or(String::new(), |body| format!("[otel]\n{body}\n"));
    temp_file(
        "proxy.toml",
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
drain_delay = "0s"

[upstream]
base_url = "{primary}"
api_key_file = "{key}"

[upstreams.backup]
base_url = "{backup}"
auth = "none"

[fallback]
cooldown = "0s"

[[routes]]
name = "smart"
match = {{ model = "smart" }}
model = "primary/model"
fallbacks = [{{ upstream = "backup", model = "backup/model" }}]
cache_ttl = "1h"

{otel}"#,
            primary = primary.url(),
            backup = backup.url(),
            key = key.display(),
        ),
    )
}

/// A stream answered by `backup-model-v2`, finished with `stop`, with usage.
fn backup_stream() -> Reply {
    let last = json!({
        "id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": "backup-model-v2",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    });
    Reply::Sse(vec![
        chunk_event("backup-model-v2", "streamed "),
        chunk_event("backup-model-v2", "answer"),
        format!("data: {last}\n\n"),
        usage_event("backup-model-v2", 11, 2),
        "data: [DONE]\n\n".to_owned(),
    ])
}

fn unavailable() -> Reply {
    Reply::Json(
        503,
        r#"{"error":{"message":"overloaded","code":503}}"#.into(),
    )
}

async fn chat(proxy: &BinaryProxy, body: Value, headers: &[(&str, &str)]) -> (u16, String) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let url = format!("http://{}/v1/chat/completions", proxy.api);
    let (status, _, body) = read_all(send("POST", &url, &all, body.to_string()).await).await;
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

fn streamed(content: &str) -> Value {
    json!({"model": "smart", "stream": true, "messages": [{"role": "user", "content": content}]})
}

/// Stops the proxy with SIGTERM; returns its access-log lines.
async fn stop(proxy: BinaryProxy) -> Vec<Value> {
    proxy.signal("TERM").await;
    let (status, logs) = proxy.wait().await;
    assert!(status.success(), "{status}");
    logs.iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .collect()
}

fn span_named<'a>(spans: &'a [ReceivedSpan], kind: i32, model: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.kind == kind && s.str("gen_ai.request.model") == Some(model))
        .unwrap_or_else(|| panic!("no span of kind {kind} for {model} in {spans:#?}"))
}

#[tokio::test]
async fn a_streamed_chat_with_a_fallback_is_one_trace_under_the_callers_span() {
    let primary = MockUpstream::start(|_| unavailable()).await;
    let backup = MockUpstream::start(|_| backup_stream()).await;
    let collector = collector().await;
    // No export on a timer: the spans reach the collector because the exit flushes them.
    let otel = format!(
        "endpoint = \"{}\"\nservice_name = \"gateway\"\nexport_interval = \"1h\"",
        endpoint_of(&collector)
    );
    let proxy = BinaryProxy::spawn(&config(&primary, &backup, Some(&otel)), &["--no-watch"]).await;
    let headers = [("traceparent", TRACEPARENT), ("tracestate", "vendor=1")];
    let (status, body) = chat(&proxy, streamed("a secret prompt"), &headers).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("answer") && body.contains("[DONE]"), "{body}");
    assert!(received_spans(&collector).is_empty());
    let access = stop(proxy).await;
    let spans = wait_spans(&collector, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == TRACE), "{spans:#?}");

    let request = span_named(&spans, SERVER, "smart");
    assert_eq!(request.name, "chat smart");
    assert_eq!(request.parent_span_id, CALLER_SPAN);
    assert_eq!(request.resource["service.name"], "gateway");
    for (key, value) in [
        ("gen_ai.operation.name", json!("chat")),
        ("gen_ai.provider.name", json!("backup")),
        ("gen_ai.request.stream", json!(true)),
        ("gen_ai.response.model", json!("backup-model-v2")),
        ("gen_ai.response.id", json!("gen-1")),
        ("gen_ai.response.finish_reasons", json!(["stop"])),
        ("gen_ai.usage.input_tokens", json!(11)),
        ("gen_ai.usage.output_tokens", json!(2)),
        ("http.request.method", json!("POST")),
        ("http.response.status_code", json!(200)),
        ("url.path", json!("/v1/chat/completions")),
        ("server.address", json!("127.0.0.1")),
        ("openrouter.route", json!("smart")),
        ("openrouter.cache.result", json!("MISS")),
        ("openrouter.attempts", json!(2)),
        ("openrouter.upstream", json!("backup")),
        ("openrouter.served_model", json!("backup/model")),
    ] {
        assert_eq!(request.attr(key), Some(&value), "{key}: {request:#?}");
    }
    assert!(request.int("server.port").is_some());
    assert_eq!(request.events, ["first_token"]);
    assert!(request
        .attr("gen_ai.response.time_to_first_chunk")
        .is_some());
    assert!(request.attr("gen_ai.input.messages").is_none());
    assert_ne!(request.status_code, STATUS_ERROR);

    let first = span_named(&spans, CLIENT, "primary/model");
    let second = span_named(&spans, CLIENT, "backup/model");
    for (attempt, number, upstream) in [(first, 1, "default"), (second, 2, "backup")] {
        assert_eq!(attempt.parent_span_id, request.span_id);
        assert_eq!(attempt.int("openrouter.attempt"), Some(number));
        assert_eq!(attempt.str("openrouter.upstream"), Some(upstream));
        assert_eq!(attempt.str("gen_ai.provider.name"), Some(upstream));
        assert!(attempt
            .str("url.full")
            .unwrap()
            .ends_with("/api/v1/chat/completions"));
    }
    assert_eq!(first.name, "chat primary/model");
    assert_eq!(first.str("error.type"), Some("status_5xx"));
    assert_eq!(first.int("http.response.status_code"), Some(503));
    assert_eq!(first.status_code, STATUS_ERROR);
    assert_eq!(second.attr("error.type"), None);
    assert_eq!(second.int("http.response.status_code"), Some(200));

    // Each upstream saw its own attempt as the parent, in the caller's trace and state.
    for (mock, attempt) in [(&primary, first), (&backup, second)] {
        let sent = mock.requests();
        let expected = format!("00-{TRACE}-{}-01", attempt.span_id);
        assert_eq!(sent[0].header("traceparent"), Some(expected.as_str()));
        assert_eq!(sent[0].header("tracestate"), Some("vendor=1"));
    }

    let line = access.iter().find(|l| l["message"] == "request").unwrap();
    assert_eq!(line["trace_id"], TRACE, "{line}");
    assert_eq!(line["attempts"], 2);
    // Content is off by default: neither the prompt nor the answer left for the collector.
    for export in collector.requests() {
        let bytes = String::from_utf8_lossy(&export.body).into_owned();
        assert!(!bytes.contains("secret prompt") && !bytes.contains("streamed "));
    }
}

#[tokio::test]
async fn content_is_exported_only_with_capture_content() {
    let primary = MockUpstream::start(|request| {
        if request.json()["stream"] == true {
            Reply::Sse(vec![
                chunk_event("m", "streamed "),
                chunk_event("m", "words"),
                "data: [DONE]\n\n".into(),
            ])
        } else {
            Reply::Json(200, chat_completion("m", "whole words"))
        }
    })
    .await;
    let backup = MockUpstream::start(|_| unavailable()).await;
    let collector = collector().await;
    let otel = format!(
        "endpoint = \"{}\"\nexport_interval = \"1h\"\ncapture_content = true",
        endpoint_of(&collector)
    );
    let proxy = BinaryProxy::spawn(&config(&primary, &backup, Some(&otel)), &["--no-watch"]).await;
    let (status, _) = chat(&proxy, streamed("prompt one"), &[]).await;
    assert_eq!(status, 200);
    let whole = json!({"model": "smart", "messages": [{"role": "user", "content": "prompt two"}]});
    assert_eq!(chat(&proxy, whole, &[]).await.0, 200);
    stop(proxy).await;
    let spans = wait_spans(&collector, 4).await;
    let requests: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == SERVER).collect();
    assert_eq!(requests.len(), 2);
    let content = |span: &ReceivedSpan, key: &str| -> Value {
        serde_json::from_str(span.str(key).unwrap_or_else(|| panic!("{key}: {span:#?}"))).unwrap()
    };
    for (stream, prompt, answer) in [
        (true, "prompt one", "streamed words"),
        (false, "prompt two", "whole words"),
    ] {
        let span = requests
            .iter()
            .find(|s| s.attr("gen_ai.request.stream") == Some(&json!(stream)))
            .unwrap();
        let input = content(span, "gen_ai.input.messages");
        assert_eq!(input[0]["parts"][0]["content"], prompt, "{input}");
        let output = content(span, "gen_ai.output.messages");
        assert_eq!(output[0]["parts"][0]["content"], answer, "{output}");
    }
}

/// Sends `count` chat requests, `workers` at a time; every one must succeed.
async fn flood(proxy: &BinaryProxy, count: usize, workers: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = format!("http://{}/v1/chat/completions", proxy.api);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (next, url) = (next.clone(), url.clone());
            tokio::spawn(async move {
                let client = client();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    let request = http::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(r#"{"model":"plain","messages":[]}"#.into())
                        .unwrap();
                    let (status, _, body) = read_all(client.request(request).await.unwrap()).await;
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn spans_dropped(proxy: &BinaryProxy) -> f64 {
    let url = format!("http://{}/metrics", proxy.admin);
    let (_, _, body) = read_all(send("GET", &url, &[], "").await).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("openrouter_otel_spans_dropped_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// 1,000 requests, each a request span and an attempt span, against a collector that takes
/// none of them: all answered, and all 2,000 spans counted as dropped.
async fn thousand_requests_lose_only_spans(endpoint: String, queue: &str) {
    let upstream = MockUpstream::start(|_| Reply::Json(200, chat_completion("m", "ok"))).await;
    let otel = format!(
        "endpoint = \"{endpoint}\"\nexport_interval = \"50ms\"\nexport_timeout = \"300ms\"\n{queue}"
    );
    let proxy =
        BinaryProxy::spawn(&config(&upstream, &upstream, Some(&otel)), &["--no-watch"]).await;
    flood(&proxy, 1000, 8).await;
    assert_eq!(upstream.request_count(), 1000);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut dropped = spans_dropped(&proxy).await;
    while dropped < 2000.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        dropped = spans_dropped(&proxy).await;
    }
    assert_eq!(dropped, 2000.0);
    stop(proxy).await;
}

#[tokio::test]
async fn a_collector_that_is_down_costs_no_request_anything_and_drops_are_counted() {
    thousand_requests_lose_only_spans(endpoint_nobody_listens_on(), "").await;
}

#[tokio::test]
async fn a_collector_that_holds_every_export_costs_no_request_anything() {
    let collector = MockUpstream::start(|_| Reply::Hang).await;
    let queue = "max_queue_size = 64\nmax_export_batch_size = 32";
    thousand_requests_lose_only_spans(endpoint_of(&collector), queue).await;
    assert!(collector.request_count() >= 1);
}

#[tokio::test]
async fn without_otel_no_trace_header_is_added_and_the_callers_goes_on_unchanged() {
    let upstream = MockUpstream::start(|_| Reply::Json(200, chat_completion("m", "ok"))).await;
    let proxy = BinaryProxy::spawn(&config(&upstream, &upstream, None), &["--no-watch"]).await;
    let plain = json!({"model": "plain", "messages": []});
    assert_eq!(chat(&proxy, plain.clone(), &[]).await.0, 200);
    let given = [("traceparent", TRACEPARENT), ("tracestate", "vendor=1")];
    assert_eq!(chat(&proxy, plain, &given).await.0, 200);
    let access = stop(proxy).await;
    let sent = upstream.requests();
    assert_eq!(sent[0].header("traceparent"), None);
    assert_eq!(sent[0].header("tracestate"), None);
    assert_eq!(sent[1].header("traceparent"), Some(TRACEPARENT));
    assert_eq!(sent[1].header("tracestate"), Some("vendor=1"));
    assert_eq!(access.len(), 2);
    assert!(
        access.iter().all(|line| line.get("trace_id").is_none()),
        "{access:?}"
    );
}

#[tokio::test]
async fn otel_is_restart_only_and_a_reload_says_so() {
    let upstream = MockUpstream::start(|_| Reply::Json(200, chat_completion("m", "ok"))).await;
    let (first, second) = (collector().await, collector().await);
    let table = |collector: &MockUpstream| {
        format!(
            "endpoint = \"{}\"\nexport_interval = \"1h\"",
            endpoint_of(collector)
        )
    };
    let path = config(&upstream, &upstream, Some(&table(&first)));
    let (proxy, trigger) = start_live_proxy(&path).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let moved = text.replace(&endpoint_of(&first), &endpoint_of(&second));
    std::fs::write(
        &path,
        moved.replace("cache_ttl = \"1h\"", "cache_ttl = \"2h\""),
    )
    .unwrap();
    trigger.reload();
    let url = proxy.admin_url("/config");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let config = loop {
        let (_, _, body) = read_all(send("GET", &url, &[], "").await).await;
        let config: Value = serde_json::from_slice(&body).unwrap();
        if config["restart_pending"] != json!([]) || tokio::time::Instant::now() > deadline {
            break config;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(config["restart_pending"], json!(["otel"]), "{config}");
    // The running exporter stays: the next request's spans go where they went.
    let body = r#"{"model":"plain","messages":[]}"#;
    let headers = [("content-type", "application/json")];
    let (status, _, _) =
        read_all(send("POST", &proxy.url("/v1/chat/completions"), &headers, body).await).await;
    assert_eq!(status, 200);
    proxy.stop().await.unwrap();
    assert_eq!(wait_spans(&first, 2).await.len(), 2);
    assert!(second.requests().is_empty());
}

#[tokio::test]
async fn a_request_refused_while_being_read_is_traced_too() {
    let upstream = MockUpstream::start(|_| Reply::Json(200, chat_completion("m", "ok"))).await;
    let collector = collector().await;
    let otel = format!(
        "endpoint = \"{}\"\nexport_interval = \"1h\"",
        endpoint_of(&collector)
    );
    let proxy =
        BinaryProxy::spawn(&config(&upstream, &upstream, Some(&otel)), &["--no-watch"]).await;
    let url = format!("http://{}/v1/embeddings", proxy.api);
    let headers = [
        ("content-type", "application/json"),
        ("traceparent", TRACEPARENT),
    ];
    let (status, _, _) = read_all(send("POST", &url, &headers, "{not json").await).await;
    assert_eq!(status, 400);
    let access = stop(proxy).await;
    let spans = wait_spans(&collector, 1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let span = &spans[0];
    assert_eq!((span.name.as_str(), span.kind), ("embeddings", SERVER));
    assert_eq!(
        (span.trace_id.as_str(), span.parent_span_id.as_str()),
        (TRACE, CALLER_SPAN)
    );
    assert_eq!(span.int("http.response.status_code"), Some(400));
    assert_eq!(span.str("error.type"), access[0]["error"].as_str());
    assert!(span.attr("error.type").is_some());
    // The client's own error leaves the server span's status unset.
    assert_eq!(span.status_code, 0);
    assert_eq!(access[0]["trace_id"], TRACE);
    assert_eq!(upstream.request_count(), 0);
}
