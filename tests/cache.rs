//! The response cache end to end: hits without upstream calls, canonical keys, TTLs,
//! Cache-Control, what is never cached, coalescing, the byte bound and tenant separation.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const CACHED: &str = r#"
[[routes]]
name = "cached"
match = { model = "cached" }
model = "openai/gpt-4o-mini"
fallbacks = ["anthropic/claude-3.5-haiku"]
cache_ttl = "10m"

[[routes]]
name = "short"
match = { model = "short" }
model = "openai/gpt-4o-mini"
cache_ttl = "2s"

[[routes]]
name = "uncached"
match = { model = "uncached" }
model = "openai/gpt-4o-mini"
"#;

/// A mock whose every answer is different ("answer 1", "answer 2", ...), so a hit is recognisable.
async fn numbered_upstream() -> MockUpstream {
    let calls = Arc::new(AtomicUsize::new(0));
    MockUpstream::start(move |request| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        if request.json()["stream"] == true {
            return openai_like_reply(request);
        }
        Reply::Json(
            200,
            chat_completion("openai/gpt-4o-mini", &format!("answer {n}")),
        )
    })
    .await
}

async fn ask(proxy: &TestProxy, body: &str, headers: &[(&str, &str)]) -> (Option<String>, String) {
    let (status, response_headers, bytes) =
        post_json(&proxy.url("/v1/chat/completions"), body, headers).await;
    assert_eq!(status, 200, "{bytes:?}");
    let cache = response_headers
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    (
        cache,
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

fn hit() -> Option<String> {
    Some("HIT".into())
}

fn miss() -> Option<String> {
    Some("MISS".into())
}

const ASK: &str =
    r#"{"model":"cached","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;

#[tokio::test]
async fn a_repeat_is_answered_from_memory() {
    let upstream = numbered_upstream().await;
    let proxy = TestProxy::start(&upstream, CACHED).await;
    assert_eq!(ask(&proxy, ASK, &[]).await, (miss(), "answer 1".into()));
    let (status, headers, bytes) = post_json(&proxy.url("/v1/chat/completions"), ASK, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(headers["x-proxy-model"], "openai/gpt-4o-mini");
    assert_eq!(headers["x-proxy-attempts"], "0");
    assert_eq!(headers["content-type"], "application/json");
    assert!(std::str::from_utf8(&bytes).unwrap().contains("answer 1"));
    assert_eq!(upstream.request_count(), 1, "the hit made no upstream call");

    // Key order and whitespace do not matter; content does.
    let reordered = "{ \"temperature\": 0,\n  \"messages\": [{\"content\": \"hi\", \"role\": \"user\"}],\n  \"model\": \"cached\" }";
    assert_eq!(
        ask(&proxy, reordered, &[]).await,
        (hit(), "answer 1".into())
    );
    let different = ASK.replace("\"hi\"", "\"hello\"");
    assert_eq!(
        ask(&proxy, &different, &[]).await,
        (miss(), "answer 2".into())
    );
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn entries_expire_after_their_route_ttl() {
    let upstream = numbered_upstream().await;
    let proxy = TestProxy::start(&upstream, CACHED).await;
    let body = ASK.replace("\"cached\"", "\"short\"");
    let stored = Instant::now();
    assert_eq!(ask(&proxy, &body, &[]).await.0, miss());
    let (cache, _) = ask(&proxy, &body, &[]).await;
    if stored.elapsed() < Duration::from_secs(2) {
        assert_eq!(cache, hit(), "fresh entries answer");
    }
    let expired = tokio::time::timeout(PATIENCE, async {
        loop {
            let (cache, answer) = ask(&proxy, &body, &[]).await;
            if cache == miss() {
                assert!(
                    stored.elapsed() >= Duration::from_secs(2),
                    "expired too early"
                );
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the entry never expired");
    assert_eq!(expired, "answer 2");
}

#[tokio::test]
async fn cache_control_from_the_client() {
    let upstream = numbered_upstream().await;
    let proxy = TestProxy::start(&upstream, CACHED).await;
    assert_eq!(ask(&proxy, ASK, &[]).await, (miss(), "answer 1".into()));
    // no-cache: skip the lookup, store the fresh answer.
    assert_eq!(
        ask(&proxy, ASK, &[("cache-control", "no-cache")]).await,
        (miss(), "answer 2".into())
    );
    assert_eq!(ask(&proxy, ASK, &[]).await, (hit(), "answer 2".into()));
    // no-store: neither read nor write.
    let bypass = Some("BYPASS".to_owned());
    assert_eq!(
        ask(&proxy, ASK, &[("cache-control", "no-store")]).await,
        (bypass.clone(), "answer 3".into())
    );
    assert_eq!(ask(&proxy, ASK, &[]).await, (hit(), "answer 2".into()));
    let fresh = ASK.replace("\"hi\"", "\"never stored\"");
    assert_eq!(
        ask(&proxy, &fresh, &[("cache-control", "no-store")]).await,
        (bypass, "answer 4".into())
    );
    assert_eq!(ask(&proxy, &fresh, &[]).await, (miss(), "answer 5".into()));
}

#[tokio::test]
async fn uncached_routes_always_go_upstream() {
    let upstream = numbered_upstream().await;
    let proxy = TestProxy::start(&upstream, CACHED).await;
    let body = ASK.replace("\"cached\"", "\"uncached\"");
    assert_eq!(ask(&proxy, &body, &[]).await, (None, "answer 1".into()));
    assert_eq!(ask(&proxy, &body, &[]).await, (None, "answer 2".into()));
}

#[tokio::test]
async fn errors_and_incomplete_answers_are_never_stored() {
    let single = "[[routes]]\nname = \"one\"\nmatch = { model = \"one\" }\nmodel = \"m\"\ncache_ttl = \"10m\"\n";
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Json(
        500,
        r#"{"error":{"message":"boom","code":500}}"#.into(),
    ));
    upstream.push(Reply::Json(
        200,
        r#"{"error":{"message":"No endpoints found","code":503}}"#.into(),
    ));
    let proxy = TestProxy::start(&upstream, single).await;
    let chat = r#"{"model":"one","messages":[]}"#;
    let url = proxy.url("/v1/chat/completions");
    let (status, _, _) = post_json(&url, chat, &[]).await;
    assert_eq!(status, 500);
    let (status, headers, body) = post_json(&url, chat, &[]).await;
    assert_eq!(
        (status.as_u16(), &headers["x-cache"]),
        (200, &"MISS".parse::<http::HeaderValue>().unwrap())
    );
    assert!(std::str::from_utf8(&body).unwrap().contains("No endpoints"));
    let (status, headers, _) = post_json(&url, chat, &[]).await;
    assert_eq!(
        (status.as_u16(), headers["x-cache"].to_str().unwrap()),
        (200, "MISS"),
        "errors were not stored"
    );
    assert_eq!(upstream.request_count(), 3);

    upstream.push(Reply::Sse(vec![chunk_event("m", "cut short")]));
    upstream.push(Reply::Sse(vec![
        chunk_event("m", "then"),
        "data: {\"error\":{\"message\":\"died\"}}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ]));
    let stream = r#"{"model":"one","stream":true,"messages":[]}"#;
    for _ in 0..2 {
        let (_, headers, _) = post_json(&url, stream, &[]).await;
        assert_eq!(headers["x-cache"], "MISS");
    }
    let (_, headers, body) = post_json(&url, stream, &[]).await;
    assert_eq!(
        headers["x-cache"], "MISS",
        "a stream without [DONE] or with an error was stored"
    );
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    let (_, headers, _) = post_json(&url, stream, &[]).await;
    assert_eq!(headers["x-cache"], "HIT", "a complete stream is stored");
    assert_eq!(upstream.request_count(), 6);
}

#[tokio::test]
async fn a_streamed_answer_is_replayed_byte_for_byte() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, CACHED).await;
    let body = r#"{"model":"cached","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let (_, first_headers, first) = post_json(&proxy.url("/v1/chat/completions"), body, &[]).await;
    let (_, headers, replay) = post_json(&proxy.url("/v1/chat/completions"), body, &[]).await;
    assert_eq!(first_headers["x-cache"], "MISS");
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(first, replay);
    assert!(std::str::from_utf8(&replay).unwrap().contains("\"usage\""));
    assert_eq!(upstream.request_count(), 1);
}

fn coalesced_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("openrouter_cache_coalesced_total "))
        .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn identical_concurrent_misses_make_one_upstream_call() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, CACHED).await;
    let scrape = |proxy: &TestProxy| {
        let url = proxy.admin_url("/metrics");
        async move {
            String::from_utf8(read_all(send("GET", &url, &[], "").await).await.2.to_vec()).unwrap()
        }
    };
    let before = coalesced_total(&scrape(&proxy).await);
    // The first request's answer is held by the mock until every other request is waiting.
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    upstream.push(Reply::Gated(
        gate_rx,
        Box::new(Reply::Json(
            200,
            chat_completion("openai/gpt-4o-mini", "shared"),
        )),
    ));
    const N: u64 = 8;
    let url = proxy.url("/v1/chat/completions");
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post_json(&url, ASK, &[]).await })
        })
        .collect();
    let waiting = tokio::time::timeout(PATIENCE, async {
        while coalesced_total(&scrape(&proxy).await) < before + N - 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waiting.is_ok(),
        "the identical requests did not wait for the first"
    );
    gate_tx.send(()).unwrap();
    let mut caches = Vec::new();
    for client in clients {
        let (status, headers, body) = client.await.unwrap();
        assert_eq!(status, 200);
        assert!(std::str::from_utf8(&body).unwrap().contains("shared"));
        caches.push(headers["x-cache"].to_str().unwrap().to_owned());
    }
    caches.sort();
    assert_eq!(
        caches.iter().filter(|c| *c == "MISS").count(),
        1,
        "{caches:?}"
    );
    assert_eq!(
        caches.iter().filter(|c| *c == "HIT").count() as u64,
        N - 1,
        "{caches:?}"
    );
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn the_byte_bound_evicts_entries() {
    let upstream = numbered_upstream().await;
    let proxy =
        TestProxy::start(&upstream, &format!("{CACHED}\n[cache]\nmax_bytes = 8000\n")).await;
    for i in 0..40 {
        let body = ASK.replace("\"hi\"", &format!("\"question {i}\""));
        ask(&proxy, &body, &[]).await;
    }
    let (_, _, metrics) = read_all(send("GET", &proxy.admin_url("/metrics"), &[], "").await).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing in {metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("openrouter_cache_bytes ") <= 8000.0, "{metrics}");
    assert!(value("openrouter_cache_entries ") < 40.0, "{metrics}");
    assert!(
        value("openrouter_cache_evictions_total{cause=\"size\"}") > 0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn callers_with_their_own_keys_never_share_answers() {
    let upstream = numbered_upstream().await;
    let proxy = TestProxy::start(
        &upstream,
        &format!("{CACHED}\n[upstream]\nauth = \"passthrough\"\n"),
    )
    .await;
    let alice = [("authorization", "Bearer sk-or-alice")];
    let bob = [("authorization", "Bearer sk-or-bob")];
    assert_eq!(ask(&proxy, ASK, &alice).await, (miss(), "answer 1".into()));
    assert_eq!(ask(&proxy, ASK, &bob).await, (miss(), "answer 2".into()));
    assert_eq!(ask(&proxy, ASK, &alice).await, (hit(), "answer 1".into()));
    assert_eq!(ask(&proxy, ASK, &bob).await, (hit(), "answer 2".into()));
    let sent = upstream.requests();
    assert_eq!(sent[0].header("authorization"), Some("Bearer sk-or-alice"));
    assert_eq!(sent[1].header("authorization"), Some("Bearer sk-or-bob"));
    // Without a key of its own, a caller is turned away in pass-through mode.
    let (status, _, body) = post_json(&proxy.url("/v1/chat/completions"), ASK, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(error_json(&body)["error"]["code"], "missing_credentials");
}
