//! What tracing costs the task serving a request: every telemetry call of one streamed chat with
//! a fallback (request span, two attempt spans with the `traceparent` for upstream, first token,
//! the answer's 22 frames looked at for its id, model and finish reasons, finish), with tracing off, on but not sampled, and on and sampled, exporting to a collector on
//! loopback that accepts everything. The export itself runs on the exporter's own thread and is
//! not in these numbers. Run with `cargo bench --bench telemetry`; under `cargo test` each runs
//! once as a smoke test. Allocation counts come from divan's allocation profiler.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly on set-up errors"
)]

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use divan::{black_box, AllocProfiler};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use openrouter_proxy::config::OtelConfig;
use openrouter_proxy::telemetry::{AttemptFacts, Inbound, Outcome, Telemetry};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
    // A span dropped at the queue costs less than one exported: the sampled numbers count only
    // if this is 0 (each bench is sized to fit the queue).
    eprintln!("spans dropped while measuring: {}", SAMPLED.spans_dropped());
}

/// A collector on 127.0.0.1:0 answering every export with an empty success, on a thread of its
/// own for the whole run.
static COLLECTOR: LazyLock<SocketAddr> = LazyLock::new(|| {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
});

fn telemetry(sample_ratio: f64) -> Telemetry {
    let config = OtelConfig {
        endpoint: format!("http://{}", *COLLECTOR),
        sample_ratio,
        max_queue_size: 65_536,
        export_interval: Duration::from_millis(200),
        ..OtelConfig::default()
    };
    Telemetry::with_env(&Some(config), |_| None).unwrap()
}

static OFF: LazyLock<Telemetry> = LazyLock::new(Telemetry::disabled);
static UNSAMPLED: LazyLock<Telemetry> = LazyLock::new(|| telemetry(0.0));
static SAMPLED: LazyLock<Telemetry> = LazyLock::new(|| telemetry(1.0));

static HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers
});

static UPSTREAM: LazyLock<Uri> =
    LazyLock::new(|| Uri::from_static("https://openrouter.ai/api/v1/chat/completions"));
static PATH: LazyLock<Uri> = LazyLock::new(|| Uri::from_static("/v1/chat/completions"));
static POST: LazyLock<Method> = LazyLock::new(|| Method::POST);
/// The frames of a streamed answer as the client gets them: 20 content chunks, the last with
/// its finish reason, usage, `[DONE]`. Each goes past the span for the answer's id, model and
/// finish reasons.
static FRAMES: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
    let chunk = |content: &str, finish: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"gen-123\",\"provider\":\"Anthropic\",\"model\":\"anthropic/claude-sonnet-4\",\"object\":\"chat.completion.chunk\",\"created\":1,\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
        ))
    };
    let mut frames: Vec<Bytes> = (0..19).map(|_| chunk("some words ", "null")).collect();
    frames.push(chunk("", "\"stop\""));
    frames.push(Bytes::from_static(
        b"data: {\"id\":\"gen-123\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34}}\n\n",
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
});

/// The pipeline has the arrival time already; reading the clock is not tracing's cost.
static RECEIVED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// One request's calls, as the pipeline makes them. The client sends no `traceparent`, so the
/// ratio decides.
fn request(telemetry: &Telemetry) -> usize {
    let mut span = telemetry.start_request(&Inbound {
        headers: black_box(&HEADERS),
        method: &POST,
        uri: &PATH,
        version: Version::HTTP_11,
        received: *RECEIVED,
        operation: "chat",
        requested_model: Some("smart"),
        stream: true,
    });
    let mut upstream_headers = HeaderMap::new();
    for (model, failed) in [("openai/gpt-4o", true), ("anthropic/claude-sonnet", false)] {
        let mut attempt = span.attempt(&AttemptFacts {
            upstream: "openrouter",
            provider: "openrouter",
            model,
            uri: &UPSTREAM,
        });
        attempt.inject(&mut upstream_headers);
        if failed {
            attempt.status(503);
            attempt.fail("status_503");
        } else {
            attempt.status(200);
            attempt.end();
        }
    }
    span.first_token();
    for frame in FRAMES.iter() {
        span.observe(black_box(frame));
    }
    let trace_id = span.trace_id().map_or(0, |id| id.len());
    // The response model, id and finish reasons come from the frames observed.
    span.finish(&Outcome {
        status: 200,
        provider: Some("openrouter"),
        input_tokens: Some(12),
        output_tokens: Some(34),
        route: Some("smart"),
        cache: Some("MISS"),
        attempts: 2,
        ..Outcome::default()
    });
    trace_id + upstream_headers.len()
}

/// `[otel]` absent.
#[divan::bench(sample_count = 200, sample_size = 50)]
fn tracing_off() -> usize {
    request(&OFF)
}

/// `[otel]` with `sample_ratio = 0`: a context to propagate, nothing recorded.
#[divan::bench(sample_count = 200, sample_size = 50)]
fn tracing_on_not_sampled() -> usize {
    request(&UNSAMPLED)
}

/// `[otel]` with `sample_ratio = 1`: three spans recorded and queued for export.
#[divan::bench(sample_count = 200, sample_size = 50)]
fn tracing_on_sampled() -> usize {
    request(&SAMPLED)
}
