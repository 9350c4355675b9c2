//! Transparent fallback, and streams that never fail silently: every trigger, the all-failed
//! answer, mid-stream errors, resume, and passive health.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;

const CHAIN: &str = r#"
[fallback]
cooldown = "0s"

[[routes]]
name = "chain"
match = { model = "chain" }
model = "primary/model"
fallbacks = ["backup/model", "last/model"]
first_byte_timeout = "500ms"
"#;

const CHAT: &str = r#"{"model":"chain","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str =
    r#"{"model":"chain","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

async fn chat(
    proxy: &TestProxy,
    body: &str,
) -> (http::StatusCode, http::HeaderMap, serde_json::Value) {
    let (status, headers, bytes) = post_json(&proxy.url("/v1/chat/completions"), body, &[]).await;
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{bytes:?}"));
    (status, headers, json)
}

#[tokio::test]
async fn each_trigger_falls_back_to_the_next_model() {
    let triggers = [
        "status 502",
        "status 408",
        "429 with a long Retry-After",
        "closed connection",
        "first-byte timeout",
        "unavailable with status 200",
    ];
    for name in triggers {
        let trigger = match name {
            "status 502" => Reply::Json(
                502,
                r#"{"error":{"message":"bad gateway","code":502}}"#.into(),
            ),
            "status 408" => Reply::Json(408, "{}".into()),
            "429 with a long Retry-After" => Reply::Headers(
                vec![("retry-after", "3600")],
                Box::new(Reply::Json(
                    429,
                    r#"{"error":{"message":"slow down","code":429}}"#.into(),
                )),
            ),
            "closed connection" => Reply::Close,
            "first-byte timeout" => Reply::Hang,
            _ => Reply::Json(
                200,
                r#"{"error":{"message":"No endpoints found","code":503}}"#.into(),
            ),
        };
        let upstream = MockUpstream::openai_like().await;
        upstream.push(trigger);
        let proxy = TestProxy::start(&upstream, CHAIN).await;
        let (status, headers, answer) = chat(&proxy, CHAT).await;
        assert_eq!(status, 200, "{name}: {answer}");
        assert_eq!(
            answer["choices"][0]["message"]["content"], "Hello from the mock",
            "{name}"
        );
        assert_eq!(headers["x-proxy-model"], "backup/model", "{name}");
        assert_eq!(headers["x-proxy-attempts"], "2", "{name}");
        assert_eq!(
            models_sent(&upstream),
            ["primary/model", "backup/model"],
            "{name}"
        );
        // The replayed body is the client's, with only the model changed.
        let second = &upstream.requests()[1];
        assert_eq!(second.json()["messages"][0]["content"], "hi");
    }
}

#[tokio::test]
async fn a_short_retry_after_is_honoured_on_the_same_model() {
    let upstream = MockUpstream::openai_like().await;
    let rate_limited = || {
        Reply::Json(
            429,
            r#"{"error":{"message":"slow down","code":429}}"#.into(),
        )
    };
    upstream.push(Reply::Headers(
        vec![("retry-after", "0")],
        Box::new(rate_limited()),
    ));
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let (status, headers, _) = chat(&proxy, CHAT).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "primary/model");
    assert_eq!(headers["x-proxy-attempts"], "2");
    assert_eq!(models_sent(&upstream), ["primary/model", "primary/model"]);

    // A long wait is not worth it: the next model answers at once.
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Headers(
        vec![("retry-after", "3600")],
        Box::new(rate_limited()),
    ));
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let (status, headers, _) = chat(&proxy, CHAT).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "backup/model");
    assert_eq!(models_sent(&upstream), ["primary/model", "backup/model"]);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Json(
        422,
        r#"{"error":{"message":"bad tool schema","code":422}}"#.into(),
    ));
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let (status, _, answer) = chat(&proxy, CHAT).await;
    assert_eq!(status, 422);
    assert_eq!(answer["error"]["message"], "bad tool schema");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn when_every_attempt_fails_the_answer_lists_them() {
    let upstream = MockUpstream::start(|r| {
        let model = r.json()["model"].as_str().unwrap().to_owned();
        Reply::Json(
            503,
            format!(r#"{{"error":{{"message":"{model} is overloaded","code":503}}}}"#),
        )
    })
    .await;
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let (status, headers, answer) = chat(&proxy, CHAT).await;
    assert_eq!(status, 503, "the last upstream status");
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(answer["error"]["code"], "all_attempts_failed");
    assert_eq!(answer["error"]["type"], "upstream_error");
    let attempts = answer["error"]["attempts"].as_array().unwrap();
    let models: Vec<&str> = attempts
        .iter()
        .map(|a| a["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["primary/model", "backup/model", "last/model"]);
    assert_eq!(
        attempts[1]["reason"],
        "status 503: backup/model is overloaded"
    );
    assert_eq!(attempts[2]["status"], 503);

    // max_attempts caps the chain.
    let capped = format!("{CHAIN}\n[fallback]\nmax_attempts = 2\n")
        .replace("[fallback]\ncooldown = \"0s\"\n", "");
    let capped = capped.replace(
        "[fallback]\nmax_attempts = 2",
        "[fallback]\ncooldown = \"0s\"\nmax_attempts = 2",
    );
    let upstream = MockUpstream::start(|_| Reply::Json(500, "{}".into())).await;
    let proxy = TestProxy::start(&upstream, &capped).await;
    let (status, _, answer) = chat(&proxy, CHAT).await;
    assert_eq!(status, 500);
    assert_eq!(answer["error"]["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn unreachable_upstream_for_every_model() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let key = temp_file("key", "k");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"http://127.0.0.1:{port}/v1\"\napi_key_file = \"{}\"\n{CHAIN}",
        key.display()
    );
    let proxy = TestProxy::start_with_config(&text).await;
    let (status, headers, answer) = chat(&proxy, CHAT).await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-should-retry"], "false");
    let attempts = answer["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts[0]["reason"].as_str().unwrap().contains("refused"),
        "{answer}"
    );
}

#[tokio::test]
async fn an_error_event_before_content_falls_back_invisibly() {
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Sse(vec![
        ": OPENROUTER PROCESSING\n\n".into(),
        "data: {\"error\":{\"message\":\"provider unavailable\",\"code\":502}}\n\n".into(),
    ]));
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let response = chat_request(&proxy, STREAM).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-proxy-model"], "backup/model");
    let (_, _, body) = read_all(response).await;
    let text = std::str::from_utf8(&body).unwrap();
    assert!(
        !text.contains("provider unavailable"),
        "the failed attempt leaked: {text}"
    );
    assert!(
        text.starts_with(": OPENROUTER PROCESSING\n\ndata: "),
        "{text}"
    );
    assert!(text.contains("\"model\":\"backup/model\""));
    assert!(text.ends_with("data: [DONE]\n\n"));

    // finish_reason "error" before content counts too, and so does a stream that ends empty.
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Sse(vec![
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"error\"}]}\n\n".into(),
    ]));
    upstream.push(Reply::Sse(vec![": OPENROUTER PROCESSING\n\n".into()]));
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let response = chat_request(&proxy, STREAM).await;
    assert_eq!(response.headers()["x-proxy-model"], "last/model");
    assert_eq!(response.headers()["x-proxy-attempts"], "3");
}

#[tokio::test]
async fn the_held_preamble_flows_the_moment_content_arrives() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let url = proxy.url("/v1/chat/completions");
    let request = tokio::spawn(async move {
        send(
            "POST",
            &url,
            &[("content-type", "application/json")],
            STREAM,
        )
        .await
    });
    tx.send(data(": OPENROUTER PROCESSING\n\n")).await.unwrap();
    tx.send(data(&chunk_event("primary/model", "first")))
        .await
        .unwrap();
    // The answer's head and first content arrive while the upstream still holds the rest.
    let response = tokio::time::timeout(PATIENCE, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.headers()["x-proxy-model"], "primary/model");
    let mut body = response.into_body();
    let seen = read_until(&mut body, "first").await;
    assert!(seen.starts_with(": OPENROUTER PROCESSING\n\n"));
    for word in ["second", "third"] {
        tx.send(data(&chunk_event("primary/model", word)))
            .await
            .unwrap();
        read_until(&mut body, word).await;
    }
    tx.send(data("data: [DONE]\n\n")).await.unwrap();
    drop(tx);
    read_until(&mut body, "[DONE]").await;
    assert!(next_data(&mut body).await.is_none());
}

/// Starts a streaming request on a route with fallbacks: its answer is held until the first
/// content event, so the request runs while `first` is sent.
async fn open_stream(
    proxy: &TestProxy,
    body: &'static str,
    tx: &tokio::sync::mpsc::Sender<Step>,
    first: &str,
) -> hyper::body::Incoming {
    let url = proxy.url("/v1/chat/completions");
    let request = tokio::spawn(async move {
        send("POST", &url, &[("content-type", "application/json")], body).await
    });
    tx.send(data(first)).await.unwrap();
    let response = tokio::time::timeout(PATIENCE, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body()
}

/// Streams `first`, then fails as `fail` says, and returns what the client received.
async fn broken_stream(
    extra: &'static str,
    fail: impl FnOnce(&tokio::sync::mpsc::Sender<Step>) -> Option<Step>,
) -> (String, MockUpstream) {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, &format!("{CHAIN}{extra}")).await;
    let mut body = open_stream(
        &proxy,
        STREAM,
        &tx,
        &chunk_event("primary/model", "partial"),
    )
    .await;
    let mut seen = read_until(&mut body, "partial").await;
    match fail(&tx) {
        Some(step) => tx.send(step).await.unwrap(),
        None => drop(tx),
    }
    while let Some(data) = next_data(&mut body).await {
        seen.push_str(std::str::from_utf8(&data).unwrap());
    }
    (seen, upstream)
}

fn last_error_event(stream: &str) -> serde_json::Value {
    let line = stream
        .lines()
        .rfind(|l| l.starts_with("data: {\"error\""))
        .unwrap_or_else(|| panic!("no error event in {stream:?}"));
    serde_json::from_str(&line["data: ".len()..]).unwrap()
}

#[tokio::test]
async fn failures_after_content_end_with_an_error_event() {
    let (cut, _) = broken_stream("", |_| Some(Step::Cut)).await;
    assert_eq!(
        last_error_event(&cut)["error"]["code"],
        "upstream_stream_error"
    );

    let (closed, _) = broken_stream("", |_| None).await;
    let error = last_error_event(&closed);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[DONE]"),
        "{error}"
    );
}

#[tokio::test]
async fn resume_continues_a_broken_stream_on_the_next_model() {
    let resume = r#"
[[routes]]
name = "resumable"
match = { model = "resumable" }
model = "primary/model"
fallbacks = ["backup/model"]
on_midstream = "resume"
"#;
    let (reply, tx, _closed) = stream_reply();
    let upstream = MockUpstream::start(|_| {
        Reply::Sse(vec![
            ": OPENROUTER PROCESSING\n\n".into(),
            chunk_event("backup/model", " world"),
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".into(),
            "data: [DONE]\n\n".into(),
        ])
    })
    .await;
    upstream.push(reply);
    let proxy = TestProxy::start(&upstream, resume).await;
    let body = r#"{"model":"resumable","stream":true,"messages":[{"role":"user","content":"say hello world"}]}"#;
    let mut stream = open_stream(&proxy, body, &tx, &chunk_event("primary/model", "Hello")).await;
    let mut seen = read_until(&mut stream, "Hello").await;
    // Half an event, then the cut: the half must never reach the client.
    tx.send(data("data: {\"choices\":[{\"delta\":{\"content\":\"BRO"))
        .await
        .unwrap();
    tx.send(Step::Cut).await.unwrap();
    while let Some(data) = next_data(&mut stream).await {
        seen.push_str(std::str::from_utf8(&data).unwrap());
    }
    assert!(!seen.contains("BRO"), "{seen}");
    assert!(!seen.contains("\"error\""), "{seen}");
    assert!(seen.contains(" world"), "{seen}");
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");

    let sent = upstream.requests();
    assert_eq!(sent.len(), 2);
    let continued = sent[1].json();
    assert_eq!(continued["model"], "backup/model");
    assert_eq!(continued["messages"][0]["content"], "say hello world");
    assert_eq!(
        continued["messages"][1],
        serde_json::json!({"role": "assistant", "content": "Hello"})
    );
}

#[tokio::test]
async fn openrouters_own_models_array_passes_through_untouched() {
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Json(503, "{}".into()));
    let proxy = TestProxy::start(&upstream, CHAIN).await;
    let body =
        r#"{"model":"chain","models":["x/first", "y/second"],"route":"fallback","messages":[]}"#;
    let (status, _, _) = chat(&proxy, body).await;
    assert_eq!(status, 200);
    for (sent, model) in upstream
        .requests()
        .iter()
        .zip(["primary/model", "backup/model"])
    {
        let expected = body.replace("\"chain\"", &format!("\"{model}\""));
        assert_eq!(std::str::from_utf8(&sent.body).unwrap(), expected);
    }
}
