//! Access control and limits over real sockets: inbound tokens, allowed routes and models,
//! concurrency and rate limits with Retry-After, and request-head limits.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;

fn hash(token: &str) -> String {
    openrouter_proxy::auth::hex(&openrouter_proxy::auth::sha256(token.as_bytes()))
}

fn tokens_config() -> String {
    format!(
        r#"
[server]
tokens = [
  {{ name = "team-a", sha256 = "{}" }},
  {{ name = "team-b", sha256 = "{}", routes = ["fast"], models = ["fast"] }},
  {{ name = "one-at-a-time", sha256 = "{}", max_concurrent = 1 }},
  {{ name = "two-per-minute", sha256 = "{}", requests_per_minute = 2 }},
]

[[routes]]
name = "fast"
match = {{ model = "fast" }}
model = "openai/gpt-4o-mini"

[[routes]]
name = "limited"
match = {{ model = "limited" }}
model = "openai/gpt-4o-mini"
max_concurrent = 1
"#,
        hash("tok-a"),
        hash("tok-b"),
        hash("tok-one"),
        hash("tok-two")
    )
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

async fn chat(
    proxy: &TestProxy,
    model: &str,
    token: Option<&str>,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    let (status, headers, body) =
        post_json(&proxy.url("/v1/chat/completions"), &body, &headers).await;
    (status.as_u16(), headers, body)
}

#[tokio::test]
async fn tokens_are_required_and_never_forwarded() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, &tokens_config()).await;
    for token in [None, Some("wrong"), Some("tok-a-but-longer")] {
        let (status, _, body) = chat(&proxy, "fast", token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(error_json(&body)["error"]["code"], "invalid_api_key");
    }
    assert_eq!(upstream.request_count(), 0);
    let (status, _, _) = chat(&proxy, "fast", Some("tok-a")).await;
    assert_eq!(status, 200);
    let sent = &upstream.requests()[0];
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
}

#[tokio::test]
async fn tokens_are_limited_to_their_routes_and_models() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, &tokens_config()).await;
    assert_eq!(chat(&proxy, "fast", Some("tok-b")).await.0, 200);
    let (status, _, body) = chat(&proxy, "openai/gpt-4o", Some("tok-b")).await;
    assert_eq!(status, 403);
    let error = error_json(&body);
    assert_eq!(error["error"]["code"], "not_allowed");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("route \"default\""),
        "{error}"
    );
    assert_eq!(chat(&proxy, "openai/gpt-4o", Some("tok-a")).await.0, 200);
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn concurrency_limits_shed_new_work_not_running_streams() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, &tokens_config()).await;
    let (name, value) = bearer("tok-one");
    let headers = [("content-type", "application/json"), (name, value.as_str())];
    let stream = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &headers,
        r#"{"model":"m","stream":true}"#,
    )
    .await;
    let mut stream = stream.into_body();
    tx.send(data(&chunk_event("m", "running"))).await.unwrap();
    read_until(&mut stream, "running").await;

    let (status, headers, body) = chat(&proxy, "m", Some("tok-one")).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        error_json(&body)["error"]["code"],
        "concurrency_limit_exceeded"
    );
    assert_eq!(
        chat(&proxy, "m", Some("tok-a")).await.0,
        200,
        "other tokens are not affected"
    );

    // The running stream is untouched and, once it ends, its slot is free again.
    tx.send(data("data: [DONE]\n\n")).await.unwrap();
    drop(tx);
    read_until(&mut stream, "[DONE]").await;
    assert!(next_data(&mut stream).await.is_none());
    assert_eq!(chat(&proxy, "m", Some("tok-one")).await.0, 200);
}

#[tokio::test]
async fn route_concurrency_limits_apply_to_everyone() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, &tokens_config()).await;
    let (name, value) = bearer("tok-a");
    let headers = [("content-type", "application/json"), (name, value.as_str())];
    // The stream's head has arrived: it holds the route's only slot.
    let stream = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &headers,
        r#"{"model":"limited","stream":true}"#,
    )
    .await;
    assert_eq!(stream.status(), 200);
    let (status, _, body) = chat(&proxy, "limited", Some("tok-a")).await;
    assert_eq!(status, 429);
    assert!(error_json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("route \"limited\""));
    drop(stream);
    drop(tx);
}

#[tokio::test]
async fn request_rates_are_limited_with_retry_after() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, &tokens_config()).await;
    assert_eq!(chat(&proxy, "m", Some("tok-two")).await.0, 200);
    assert_eq!(chat(&proxy, "m", Some("tok-two")).await.0, 200);
    let (status, headers, body) = chat(&proxy, "m", Some("tok-two")).await;
    assert_eq!(status, 429);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(error_json(&body)["error"]["code"], "rate_limit_exceeded");
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(
        &upstream,
        "[server]\nmax_header_bytes = 8192\nmax_headers = 20\n",
    )
    .await;
    let big = "x".repeat(10_000);
    let response = send(
        "GET",
        &proxy.url("/v1/models"),
        &[("x-big", big.as_str())],
        "",
    )
    .await;
    assert_eq!(response.status(), 431);
    let names: Vec<String> = (0..30).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let response = send("GET", &proxy.url("/v1/models"), &many, "").await;
    assert_eq!(response.status(), 431);
    let (status, _, _) = read_all(send("GET", &proxy.url("/v1/models"), &[], "").await).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn hash_token_prints_the_sha256() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_openrouter-proxy"))
        .arg("--hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"tok-a\n")
        .await
        .unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        hash("tok-a")
    );
}
