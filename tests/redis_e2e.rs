//! Two replicas of the real binary sharing one real `redis-server`: an answer cached through one
//! is a Redis hit on the other with the upstream called once, and a stream seen by one is
//! replayed by the other with the same events (through raw HTTP and the official Python SDK).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::redis::RedisServer;
use common::replicas::{
    cache_keys, chat, chat_body, header, metrics_of, replica_config, start_pair, stop, wait_cached,
};
use common::{client_output, labelled, python, root, BinaryProxy, MockUpstream, PATIENCE};

/// `op_timeout` of replicas that must not fall back on a loaded machine.
const STEADY: &str = "5s";

const CACHED_ROUTE: &str =
    "[[routes]]\nname = \"cached\"\nmatch = { model = \"cached\" }\nmodel = \"m\"\ncache_ttl = \"10m\"\n";

fn hits(text: &str, tier: &str) -> f64 {
    let labels = [("route", "cached"), ("result", "hit"), ("tier", tier)];
    labelled(text, "openrouter_cache_requests_total", &labels).unwrap_or(0.0)
}

#[tokio::test]
async fn an_answer_cached_through_one_replica_is_a_redis_hit_on_the_other() {
    let server = RedisServer::start().await;
    let upstream = MockUpstream::openai_like().await;
    let config = replica_config(&server, &upstream.url(), STEADY, CACHED_ROUTE);
    let (a, b) = start_pair(&config).await;
    let body = chat_body("cached", "what is shared?", false);

    let (status, headers, first) = chat(&a, &body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-cache"), Some("MISS"));
    wait_cached(&server, 1).await;

    let (status, headers, second) = chat(&b, &body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-cache"), Some("HIT"));
    assert_eq!(header(&headers, "x-cache-tier"), Some("redis"));
    assert_eq!(header(&headers, "x-proxy-model"), Some("m"));
    assert_eq!(second, first, "the same answer");
    assert_eq!(upstream.request_count(), 1, "the upstream was called once");

    // The Redis hit filled B's memory: the next one does not leave the process.
    let (_, headers, third) = chat(&b, &body, &[]).await;
    assert_eq!(header(&headers, "x-cache-tier"), Some("memory"));
    assert_eq!(third, first);
    let metrics = metrics_of(&b).await;
    assert_eq!(hits(&metrics, "redis"), 1.0);
    assert_eq!(hits(&metrics, "memory"), 1.0);
    assert_eq!(upstream.request_count(), 1);

    let keys = cache_keys(&server).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].len() == "orp:cache:".len() + 32 && !keys[0].contains("shared"),
        "a key is a hash, never prompt text: {keys:?}"
    );
    stop(a).await;
    stop(b).await;
}

/// Reads a streamed answer whole: headers and the raw SSE bytes.
async fn stream_from(proxy: &BinaryProxy, body: &str) -> (http::HeaderMap, String) {
    let (status, headers, bytes) = chat(proxy, body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    (headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The SSE events of a body, in order.
fn events(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect()
}

#[tokio::test]
async fn a_stream_seen_by_one_replica_is_replayed_event_by_event_by_the_other() {
    let server = RedisServer::start().await;
    let upstream = MockUpstream::openai_like().await;
    let config = replica_config(&server, &upstream.url(), STEADY, CACHED_ROUTE);
    let (a, b) = start_pair(&config).await;
    let body = serde_json::json!({
        "model": "cached", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "stream it once"}],
    })
    .to_string();

    let (headers, original) = stream_from(&a, &body).await;
    assert_eq!(header(&headers, "x-cache"), Some("MISS"));
    wait_cached(&server, 1).await;
    let (headers, replayed) = stream_from(&b, &body).await;
    assert_eq!(header(&headers, "x-cache"), Some("HIT"));
    assert_eq!(header(&headers, "x-cache-tier"), Some("redis"));
    let (original, replayed) = (events(&original), events(&replayed));
    assert!(
        original.len() >= 7,
        "content, stop, usage and [DONE]: {original:?}"
    );
    assert_eq!(replayed, original, "the same events in the same order");
    assert_eq!(replayed.last(), Some(&"data: [DONE]"));
    assert_eq!(upstream.request_count(), 1);
    stop(a).await;
    stop(b).await;
}

/// Runs `tests/sdk/redis_replay_python.py` against `proxy` and returns what it printed.
async fn sdk_stream(proxy: &BinaryProxy, prompt: &str) -> serde_json::Value {
    let mut client = tokio::process::Command::new(python());
    client
        .arg(root().join("tests/sdk/redis_replay_python.py"))
        .env("OPENAI_BASE_URL", format!("http://{}/v1", proxy.api))
        .env("PROMPT", prompt)
        .env_remove("OPENAI_API_KEY");
    let output = client_output(client, PATIENCE * 3).await;
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn the_python_sdk_gets_the_same_chunks_from_a_replica_that_never_saw_the_stream() {
    let server = RedisServer::start().await;
    let upstream = MockUpstream::openai_like().await;
    let config = replica_config(&server, &upstream.url(), STEADY, CACHED_ROUTE);
    let (a, b) = start_pair(&config).await;

    let first = sdk_stream(&a, "through the sdk").await;
    assert_eq!(first["cache"], "MISS");
    wait_cached(&server, 1).await;
    let second = sdk_stream(&b, "through the sdk").await;
    assert_eq!(
        (&second["cache"], &second["tier"]),
        (&"HIT".into(), &"redis".into())
    );
    let chunks = second["chunks"].as_array().unwrap();
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
    assert_eq!(second["chunks"], first["chunks"], "chunk for chunk");
    assert_eq!(upstream.request_count(), 1);
    stop(a).await;
    stop(b).await;
}
