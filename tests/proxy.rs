//! The request path end to end over real sockets: routing, rewriting, headers, streaming,
//! cancellation and the error answers.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = r#"
[upstream.headers]
"HTTP-Referer" = "https://example.com"
"X-Title" = "example-app"

[[routes]]
name = "team-a"
match = { model = "openai/*", headers = { "x-team" = "a" } }
model = "openai/gpt-4o"
set_headers = { "X-Title" = "team-a" }
remove_headers = ["x-team"]

[[routes]]
name = "fast"
match = { model = "fast" }
model = "openai/gpt-4o-mini"
fallbacks = ["anthropic/claude-3.5-haiku"]
set_headers = { "X-Title" = "fast-lane", "x-extra" = "1" }
remove_headers = ["x-drop-me"]

[[routes]]
name = "slow"
match = { model = "slow" }
model = "slow/model"
first_byte_timeout = "300ms"
"#;

/// Messages with escapes, unicode and odd spacing that a re-serializer would normalise.
const ODD_BODY: &str = "{\"model\" :  \"fast\",\n  \"messages\": [ {\"role\":\"user\",\"content\":\"h\\u00e9llo \\\"quoted\\\" \u{1F600}\"} ],\n  \"temperature\": 0.50, \"n\":1e0 }";

#[tokio::test]
async fn rewrites_the_model_and_keeps_every_other_byte() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;

    let (status, headers, body) =
        post_json(&proxy.url("/v1/chat/completions"), ODD_BODY, &[]).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(headers["x-proxy-model"], "openai/gpt-4o-mini");
    assert_eq!(headers["x-proxy-attempts"], "1");
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["model"], "openai/gpt-4o-mini");

    let sent = &upstream.requests()[0];
    assert_eq!(sent.path_and_query, "/api/v1/chat/completions");
    let expected = ODD_BODY.replacen("\"fast\"", "\"openai/gpt-4o-mini\"", 1);
    assert_eq!(std::str::from_utf8(&sent.body).unwrap(), expected);
}

#[tokio::test]
async fn unmatched_requests_pass_through_unchanged() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let body = ODD_BODY.replacen("\"fast\"", "\"mistralai/mistral-small\"", 1);

    let (status, headers, _) = post_json(&proxy.url("/v1/chat/completions"), &body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "mistralai/mistral-small");
    assert_eq!(upstream.requests()[0].body, body.as_bytes());
}

#[tokio::test]
async fn injects_the_key_and_edits_headers() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let client_headers = [
        ("authorization", "Bearer sk-client-should-not-pass"),
        ("x-drop-me", "1"),
        ("x-kept", "yes"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("expect", "100-continue"),
        ("accept-encoding", "gzip"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("x-api-key", "sk-client-should-not-pass"),
        ("api-key", "sk-client-should-not-pass"),
        ("x-multi", "a"),
        ("x-multi", "b"),
    ];
    let body = r#"{"model":"fast","messages":[]}"#;
    let (status, _, _) = post_json(&proxy.url("/v1/chat/completions"), body, &client_headers).await;
    assert_eq!(status, 200);

    let sent = &upstream.requests()[0];
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
    assert_eq!(sent.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(sent.header("http-referer"), Some("https://example.com"));
    assert_eq!(
        sent.header("x-title"),
        Some("fast-lane"),
        "the route overrides the global title"
    );
    assert_eq!(sent.header("x-openrouter-title"), Some("example-app"));
    assert_eq!(sent.header("x-extra"), Some("1"));
    assert_eq!(sent.header("x-kept"), Some("yes"));
    assert_eq!(sent.header("x-drop-me"), None);
    assert_eq!(
        sent.header("x-hop"),
        None,
        "headers named in Connection are hop-by-hop"
    );
    assert!(sent.header("x-request-id").is_some());
    assert_eq!(sent.header("accept-encoding"), Some("identity"));
    assert_eq!(sent.headers.get_all("accept-encoding").iter().count(), 1);
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "x-api-key",
        "api-key",
        "expect",
    ] {
        assert_eq!(sent.header(name), None, "{name} is not passed on");
    }
    let multi: Vec<_> = sent.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"], "every value of a header, in order");
}

#[tokio::test]
async fn glob_and_header_matching() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let body = r#"{"model":"openai/o3","messages":[]}"#;

    let (_, headers, _) =
        post_json(&proxy.url("/v1/chat/completions"), body, &[("x-team", "a")]).await;
    assert_eq!(headers["x-proxy-model"], "openai/gpt-4o");
    let (_, headers, _) =
        post_json(&proxy.url("/v1/chat/completions"), body, &[("x-team", "b")]).await;
    assert_eq!(
        headers["x-proxy-model"], "openai/o3",
        "header mismatch: no route"
    );

    let sent = upstream.requests();
    assert_eq!(sent[0].json()["model"], "openai/gpt-4o");
    assert_eq!(sent[0].header("x-team"), None, "removed by the route");
    assert_eq!(sent[0].header("x-title"), Some("team-a"));
    assert_eq!(sent[1].json()["model"], "openai/o3");
    assert_eq!(sent[1].header("x-team"), Some("b"));
}

#[tokio::test]
async fn every_path_and_method_maps_under_base_url() {
    let upstream = MockUpstream::start(|r| {
        Reply::Json(
            200,
            format!("{{\"seen\":\"{} {}\"}}", r.method, r.path_and_query),
        )
    })
    .await;
    let proxy = TestProxy::start(&upstream, "").await;

    for (method, path, upstream_path) in [
        ("GET", "/v1/models", "/api/v1/models"),
        (
            "GET",
            "/v1/generation?id=gen-1",
            "/api/v1/generation?id=gen-1",
        ),
        ("DELETE", "/v1/files/abc", "/api/v1/files/abc"),
        ("POST", "/v1/moderations", "/api/v1/moderations"),
    ] {
        let response = send(method, &proxy.url(path), &[], "").await;
        let (status, _, body) = read_all(response).await;
        assert_eq!(status, 200);
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["seen"], format!("{method} {upstream_path}"));
    }
}

#[tokio::test]
async fn streams_each_event_before_the_upstream_has_finished() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;

    // A model without fallbacks: nothing is held back, not even the processing comment.
    let body = r#"{"model":"openai/gpt-4o-mini","stream":true,"messages":[]}"#;
    let response = chat_request(&proxy, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    // The mock sends each piece only after the client has read the previous one: a proxy that
    // buffered would deadlock here, and the patience timeout would fail the test.
    let pieces = [
        ": OPENROUTER PROCESSING\n\n".to_owned(),
        chunk_event("openai/gpt-4o-mini", "Hel"),
        chunk_event("openai/gpt-4o-mini", "lo"),
        usage_event("openai/gpt-4o-mini", 5, 2),
        "data: [DONE]\n\n".to_owned(),
    ];
    let mut received = String::new();
    for piece in &pieces {
        tx.send(data(piece)).await.unwrap();
        let seen = read_until(&mut body, piece).await;
        received.push_str(&seen);
    }
    drop(tx);
    assert!(
        next_data(&mut body).await.is_none(),
        "the stream ends when the upstream's does"
    );
    assert_eq!(
        received,
        pieces.concat(),
        "events pass through byte for byte"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_request() {
    let (upstream, tx, closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, "").await;

    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    let response = chat_request(&proxy, body).await;
    let mut body = response.into_body();
    tx.send(data(&chunk_event("m", "first"))).await.unwrap();
    read_until(&mut body, "first").await;
    drop(body);

    // Keep offering chunks: the proxy must drop the upstream response, which closes the channel.
    let cancelled = tokio::time::timeout(PATIENCE, async {
        let mut closed = closed;
        loop {
            tokio::select! {
                _ = &mut closed => return,
                sent = tx.send(data(&chunk_event("m", "more"))) => {
                    if sent.is_err() { return; }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await;
    assert!(cancelled.is_ok(), "the upstream request was not cancelled");
}

#[tokio::test]
async fn a_stream_cut_midway_ends_with_an_error_event() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, "").await;

    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    let response = chat_request(&proxy, body).await;
    let mut body = response.into_body();
    tx.send(data(&chunk_event("m", "partial"))).await.unwrap();
    read_until(&mut body, "partial").await;
    tx.send(Step::Cut).await.unwrap();

    let rest = read_until(&mut body, "upstream_stream_error").await;
    let event = rest
        .lines()
        .find(|l| l.starts_with("data: {\"error\""))
        .unwrap();
    let error: serde_json::Value = serde_json::from_str(&event["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["type"], "upstream_error");
    assert!(next_data(&mut body).await.is_none());
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_errors() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\n").await;
    let chat = proxy.url("/v1/chat/completions");

    let json = "application/json";
    let cases = [
        ("{\"model\": \"x\", ", json, "invalid_json"),
        ("[1,2]", json, "invalid_json"),
        ("", json, "invalid_json"),
        ("{\"messages\": []}", json, "missing_model"),
        ("{\"model\": 42}", json, "invalid_model"),
        (
            "model=x",
            "application/x-www-form-urlencoded",
            "unsupported_content_type",
        ),
    ];
    for (body, content_type, code) in cases {
        let response = send(
            "POST",
            &chat,
            &[("content-type", content_type)],
            body.to_owned(),
        )
        .await;
        let (status, headers, bytes) = read_all(response).await;
        assert_eq!(status, 400, "{body:?}: {bytes:?}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(error_json(&bytes)["error"]["code"], code, "{body:?}");
    }
    for path in ["/", "/v2/chat/completions", "/v1x", "/metrics"] {
        let (status, _, bytes) = read_all(send("GET", &proxy.url(path), &[], "").await).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(error_json(&bytes)["error"]["code"], "unknown_path");
    }
    for path in ["/v1/../admin", "/v1/a/%2e%2e/b", "/v1/a%2Fb"] {
        let (status, _, bytes) = read_all(send("GET", &proxy.url(path), &[], "").await).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(error_json(&bytes)["error"]["code"], "invalid_path");
    }
    assert_eq!(
        upstream.request_count(),
        0,
        "nothing bad reached the upstream"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_without_being_read() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nmax_body_bytes = 1000\n").await;

    let big = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(5000));
    let (status, _, bytes) = post_json(&proxy.url("/v1/chat/completions"), &big, &[]).await;
    assert_eq!(status, 413);
    assert_eq!(error_json(&bytes)["error"]["code"], "body_too_large");

    // Without Content-Length (chunked), the proxy stops reading at the limit: it answers 413 while
    // the client is still sending and has sent far more than the limit in total.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("400\r\n{}\r\n", "y".repeat(0x400));
    stream.write_all(chunk.as_bytes()).await.unwrap();
    stream.write_all(chunk.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let key = temp_file("key", "k");
    let proxy = TestProxy::start_with_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"http://127.0.0.1:{port}/v1\"\napi_key_file = \"{}\"\n",
        key.display()
    ))
    .await;
    let (status, _, bytes) =
        post_json(&proxy.url("/v1/chat/completions"), r#"{"model":"m"}"#, &[]).await;
    assert_eq!(status, 502);
    let error = error_json(&bytes);
    assert_eq!(error["error"]["code"], "upstream_unreachable");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{error}"
    );
}

#[tokio::test]
async fn no_response_head_within_first_byte_timeout_is_504() {
    let upstream = MockUpstream::start(|_| Reply::Hang).await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let (status, _, bytes) = post_json(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"slow"}"#,
        &[],
    )
    .await;
    assert_eq!(status, 504);
    let error = error_json(&bytes);
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("300ms"),
        "{error}"
    );
}

#[tokio::test]
async fn upstream_client_errors_are_returned_as_they_are() {
    let upstream = MockUpstream::start(|_| {
        Reply::Json(
            400,
            r#"{"error":{"message":"bad temperature","code":400}}"#.to_owned(),
        )
    })
    .await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let (status, _, bytes) = post_json(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"fast"}"#,
        &[],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        &bytes[..],
        br#"{"error":{"message":"bad temperature","code":400}}"#
    );
    assert_eq!(
        upstream.request_count(),
        1,
        "a client error is not retried on a fallback"
    );
}

#[tokio::test]
async fn a_failing_model_falls_back_to_the_next() {
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Json(
        503,
        r#"{"error":{"message":"overloaded","code":503}}"#.to_owned(),
    ));
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let (status, headers, bytes) = post_json(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"fast"}"#,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{bytes:?}");
    assert_eq!(headers["x-proxy-model"], "anthropic/claude-3.5-haiku");
    assert_eq!(headers["x-proxy-attempts"], "2");
    let sent = upstream.requests();
    assert_eq!(sent[0].json()["model"], "openai/gpt-4o-mini");
    assert_eq!(sent[1].json()["model"], "anthropic/claude-3.5-haiku");
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_hurt_other_clients() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "").await;
    for garbage in [
        &b"\x00\x01\x02 not http\r\n\r\n"[..],
        b"GET /v1/models HTTP/1.1\r\nbad header line\r\n\r\n",
        b"POST /v1/x HTTP/1.1\r\ncontent-length: zz\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }
    let (status, _, _) = read_all(send("GET", &proxy.url("/v1/models"), &[], "").await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let client: TestClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = http::Request::get(proxy.url("/v1/models"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 200);
    assert!(std::str::from_utf8(&body).unwrap().contains("gpt-4o-mini"));
}

/// The version is told by peeking at the first bytes: a preface that arrives in pieces is still
/// HTTP/2 (the pause makes the proxy see part of it first), and hyper then reads it whole.
#[tokio::test]
async fn an_h2_preface_sent_in_pieces_is_served_as_http2() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
    // An empty SETTINGS frame.
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    stream.read_exact(&mut frame).await.unwrap();
    assert_eq!(
        frame[3], 4,
        "the server's first frame is its SETTINGS: {frame:?}"
    );
}

#[tokio::test]
async fn admin_endpoints() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (status, _, _) = read_all(send("GET", &proxy.admin_url("/healthz"), &[], "").await).await;
    assert_eq!(status, 200);
    let (status, _, _) = read_all(send("GET", &proxy.admin_url("/readyz"), &[], "").await).await;
    assert_eq!(status, 200);
    post_json(&proxy.url("/v1/chat/completions"), r#"{"model":"m"}"#, &[]).await;
    let (status, _, body) =
        read_all(send("GET", &proxy.admin_url("/metrics"), &[], "").await).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("openrouter_requests_total{"), "{text}");
    assert!(!text.contains(TEST_KEY));
}

#[tokio::test]
async fn without_a_key_the_proxy_is_not_ready_and_says_why() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start_with_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key_env = \"OPENROUTER_PROXY_TEST_UNSET_KEY\"\n",
        upstream.url()
    ))
    .await;
    let (status, _, body) = read_all(send("GET", &proxy.admin_url("/readyz"), &[], "").await).await;
    assert_eq!(status, 503);
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .contains("OPENROUTER_PROXY_TEST_UNSET_KEY"));
    let (status, _, bytes) =
        post_json(&proxy.url("/v1/chat/completions"), r#"{"model":"m"}"#, &[]).await;
    assert_eq!(status, 503);
    assert_eq!(error_json(&bytes)["error"]["code"], "missing_api_key");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn shutdown_lets_an_open_stream_finish() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    let response = chat_request(&proxy, body).await;
    let mut body = response.into_body();
    tx.send(data(&chunk_event("m", "before"))).await.unwrap();
    read_until(&mut body, "before").await;

    let admin = proxy.admin;
    let stopping = tokio::spawn(proxy.stop());
    // Readiness turns 503 while the stream is still open.
    wait_not_ready(&admin.to_string()).await;
    tx.send(data(&chunk_event("m", "after"))).await.unwrap();
    tx.send(data("data: [DONE]\n\n")).await.unwrap();
    drop(tx);
    let rest = read_until(&mut body, "[DONE]").await;
    assert!(rest.contains("after"));
    assert!(next_data(&mut body).await.is_none());
    stopping.await.unwrap().unwrap();
}
