//! Micro-benchmarks of the per-request work the proxy does on its own: routing over a large rule
//! table, reading the request facts from a JSON body, rewriting the model without re-encoding the
//! rest, scanning a streamed answer, and formatting the access-log line. Run with `scripts/bench`
//! or `cargo bench --bench hot_path`; under `cargo test` each runs once as a smoke test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly on set-up errors"
)]

use std::fmt::Write as _;
use std::sync::LazyLock;

use bytes::Bytes;
use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use http::{HeaderMap, HeaderValue};
use openrouter_proxy::cache::CacheKey;
use openrouter_proxy::pipeline::body::JsonBody;
use openrouter_proxy::record::access::AccessLine;
use openrouter_proxy::runtime::router::{RequestFacts, Router};
use openrouter_proxy::sse::Scanner;
use openrouter_proxy::Config;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

fn main() {
    divan::main();
}

// ---------------------------------------------------------------------------------------------
// Routing

const RULES: usize = 100;

/// 100 rules, a third each of globs (`vendor0/*`), exact names and exact names with a header
/// condition, the way a large shared config grows.
static ROUTER: LazyLock<Router> = LazyLock::new(|| {
    let mut text = String::new();
    for i in 0..RULES {
        let matcher = match i % 3 {
            0 => format!("{{ model = \"vendor{i}/*\" }}"),
            1 => format!("{{ model = \"model-{i}\" }}"),
            _ => format!("{{ model = \"model-{i}\", headers = {{ \"x-team\" = \"team-{i}\" }} }}"),
        };
        writeln!(
            text,
            "[[routes]]\nname = \"rule-{i}\"\nmatch = {matcher}\nmodel = \"openai/gpt-4o-mini\"\n\
             fallbacks = [\"anthropic/claude-3.5-haiku\"]\nset_headers = {{ \"X-Title\" = \"r{i}\" }}\n"
        )
        .unwrap();
    }
    let config = Config::parse(&text).unwrap();
    let upstreams = openrouter_proxy::runtime::upstreams::Upstreams::build(&config, None).unwrap();
    Router::compile(&config, &upstreams)
});

static HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("authorization", HeaderValue::from_static("Bearer unused"));
    headers.insert(
        "user-agent",
        HeaderValue::from_static("OpenAI/Python 1.99.0"),
    );
    headers.insert("x-team", HeaderValue::from_static("team-98"));
    headers
});

fn route(model: &str) -> usize {
    let route = ROUTER.route(&RequestFacts {
        model: Some(black_box(model)),
        path: black_box("/v1/chat/completions"),
        headers: &HEADERS,
    });
    route.name.len()
}

/// The first rule (a glob) matches.
#[divan::bench]
fn route_first_of_100() -> usize {
    route("vendor0/gpt-4o")
}

/// The last rule (a glob) matches, after 99 misses.
#[divan::bench]
fn route_last_of_100() -> usize {
    route("vendor99/some-model-name")
}

/// No rule matches: every one is tried, then the pass-through default applies.
#[divan::bench]
fn route_none_of_100() -> usize {
    route("mistralai/mistral-large-2411")
}

// ---------------------------------------------------------------------------------------------
// The request body

/// A chat request of about 100 KB: a long conversation with escapes and unicode in the content,
/// `model` after `messages` so the parser has to walk the whole body to find it.
static BIG_BODY: LazyLock<Bytes> = LazyLock::new(|| {
    let mut messages = Vec::new();
    let mut size = 0;
    let mut turn = 0_usize;
    while size < 100 * 1024 {
        let content = format!(
            "Turn {turn}: please review this snippet: \"fn main() {{ println!(\\\"héllo\\\"); }}\"\n\
             and explain ownership, borrowing and lifetimes — briefly. {}",
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(8)
        );
        size += content.len() + 40;
        let role = if turn.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        messages.push(serde_json::json!({"role": role, "content": content}));
        turn += 1;
    }
    Bytes::from(
        serde_json::json!({
            "messages": messages,
            "temperature": 0.7,
            "max_tokens": 1024,
            "model": "fast",
            "stream": true,
            "stream_options": {"include_usage": true}
        })
        .to_string(),
    )
});

/// Finding `model` and `stream` in a ~100 KB body (validating the whole body as JSON).
#[divan::bench]
fn json_facts_100kb(bencher: Bencher) {
    let body = BIG_BODY.clone();
    bencher
        .counter(BytesCount::new(body.len()))
        .bench(|| JsonBody::parse(black_box(body.clone())).unwrap());
}

/// Rewriting `model` in an already parsed ~100 KB body: one copy of the bytes, no re-encoding.
#[divan::bench]
fn model_rewrite_100kb(bencher: Bencher) {
    let parsed = JsonBody::parse(BIG_BODY.clone()).unwrap();
    bencher
        .counter(BytesCount::new(parsed.bytes.len()))
        .bench(|| parsed.with_model(black_box("openai/gpt-4o-mini")));
}

/// Parse and rewrite together, as one request does.
#[divan::bench]
fn parse_and_rewrite_100kb(bencher: Bencher) {
    let body = BIG_BODY.clone();
    bencher.counter(BytesCount::new(body.len())).bench(|| {
        let parsed = JsonBody::parse(black_box(body.clone())).unwrap();
        parsed.with_model("openai/gpt-4o-mini")
    });
}

/// A typical small (~400 B) chat request.
fn small_body() -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "fast",
            "messages": [
                {"role": "system", "content": "You are a concise assistant for platform engineers."},
                {"role": "user", "content": "Summarise the trade-offs between a sidecar and a shared gateway in five bullet points."}
            ],
            "temperature": 0.2,
            "max_tokens": 256
        })
        .to_string(),
    )
}

/// Parse and rewrite for a typical small (~400 B) chat request.
#[divan::bench]
fn parse_and_rewrite_small(bencher: Bencher) {
    let body = small_body();
    bencher.counter(BytesCount::new(body.len())).bench(|| {
        let parsed = JsonBody::parse(black_box(body.clone())).unwrap();
        parsed.with_model("openai/gpt-4o-mini")
    });
}

// ---------------------------------------------------------------------------------------------
// The streamed answer

/// About 1 MB of OpenRouter-style SSE, one event per frame as the upstream sends them: a
/// processing comment, content chunks, the finish chunk, usage and `[DONE]`.
static SSE_EVENTS: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let event = serde_json::json!({
            "id": "gen-1732400000-AbCdEfGhIjKlMnOpQrSt", "provider": "OpenAI",
            "model": "openai/gpt-4o-mini", "object": "chat.completion.chunk", "created": 1_732_400_000,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]
        });
        Bytes::from(format!("data: {event}\n\n"))
    };
    let mut events = vec![Bytes::from_static(b": OPENROUTER PROCESSING\n\n")];
    let mut size = 0;
    let mut n = 0;
    while size < 1024 * 1024 {
        let event = chunk(
            serde_json::json!({"role": "assistant", "content": format!(" token{n}")}),
            serde_json::Value::Null,
        );
        size += event.len();
        events.push(event);
        n += 1;
    }
    events.push(chunk(serde_json::json!({}), "stop".into()));
    let usage = serde_json::json!({
        "id": "gen-1732400000-AbCdEfGhIjKlMnOpQrSt", "object": "chat.completion.chunk",
        "model": "openai/gpt-4o-mini", "choices": [],
        "usage": {"prompt_tokens": 57, "completion_tokens": n, "total_tokens": 57 + n, "cost": 0.0042}
    });
    events.push(Bytes::from(format!("data: {usage}\n\n")));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
});

fn sse_len() -> usize {
    SSE_EVENTS.iter().map(Bytes::len).sum()
}

fn scan(frames: &[Bytes], collect_text: bool) -> usize {
    let mut scanner = Scanner::new(collect_text);
    let mut events = 0;
    for frame in frames {
        scanner.feed(black_box(frame), |_| events += 1);
    }
    assert!(scanner.done && scanner.usage.is_some());
    events
}

/// Scanning ~1 MB of SSE fed one event per frame (usage, errors and `[DONE]` only).
#[divan::bench]
fn sse_scan_1mb_per_event(bencher: Bencher) {
    bencher
        .counter(BytesCount::new(sse_len()))
        .bench(|| scan(&SSE_EVENTS, false));
}

/// The same bytes in 16 KiB reads that split events anywhere.
#[divan::bench]
fn sse_scan_1mb_16k_reads(bencher: Bencher) {
    let all: Vec<u8> = SSE_EVENTS.iter().flat_map(|b| b.iter().copied()).collect();
    let frames: Vec<Bytes> = all.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
    bencher
        .counter(BytesCount::new(all.len()))
        .bench(|| scan(&frames, false));
}

/// Scanning while collecting the content text (what resuming a broken stream needs).
#[divan::bench]
fn sse_scan_1mb_collect_text(bencher: Bencher) {
    bencher
        .counter(BytesCount::new(sse_len()))
        .bench(|| scan(&SSE_EVENTS, true));
}

// ---------------------------------------------------------------------------------------------
// The cache key

const CHAIN: [&str; 2] = ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"];

/// The cache key of a typical small (~400 B) chat request: canonical JSON hashed with the path,
/// the attempt chain and the caller.
#[divan::bench]
fn cache_key_small(bencher: Bencher) {
    let body = small_body();
    bencher.counter(BytesCount::new(body.len())).bench(|| {
        CacheKey::new(
            black_box("/chat/completions"),
            &CHAIN,
            Some(b"Bearer sk-tenant".as_slice()),
            black_box(&body),
        )
        .unwrap()
    });
}

/// The cache key of the ~100 KB conversation.
#[divan::bench]
fn cache_key_100kb(bencher: Bencher) {
    let body = BIG_BODY.clone();
    bencher.counter(BytesCount::new(body.len())).bench(|| {
        CacheKey::new(
            black_box("/chat/completions"),
            &CHAIN,
            None,
            black_box(&body),
        )
        .unwrap()
    });
}

// ---------------------------------------------------------------------------------------------
// Access log

/// The access-log line through `tracing-subscriber`'s JSON formatter, set up as the binary sets
/// it up, into a sink: how every line was written before.
#[divan::bench]
fn access_line_tracing_formatter(bencher: Bencher) {
    use tracing_subscriber::layer::SubscriberExt as _;
    let layer = tracing_subscriber::fmt::layer().json();
    let layer = layer.flatten_event(true).with_current_span(false);
    let subscriber = tracing_subscriber::registry().with(layer.with_writer(std::io::sink));
    let line = AccessLine::example();
    tracing::subscriber::with_default(subscriber, || {
        bencher.bench_local(|| black_box(&line).event());
    });
}

/// The same line with its timestamp serialized directly into a reused buffer, as the binary now
/// writes it (the write to standard output is the same one call in both).
#[divan::bench]
fn access_line_direct(bencher: Bencher) {
    let line = AccessLine::example();
    let (mut timestamp, mut out) = (String::new(), Vec::new());
    bencher.bench_local(|| {
        timestamp.clear();
        out.clear();
        let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
        black_box(&line).json_line(&timestamp, &mut out).unwrap();
        out.len()
    });
}
