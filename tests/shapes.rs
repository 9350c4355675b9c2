//! The API shapes besides chat, over real sockets: Anthropic Messages and the OpenAI Responses API
//! through the proxy (streams end exactly at their last event, fallback before content, the
//! shape's error event after it, usage in the metrics, caching, the proxy's own errors in the
//! client's shape), every header a client may carry its key in, and the official Anthropic and
//! OpenAI SDKs as clients. `scripts/test` installs the SDKs; these tests fail when one is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use bytes::Bytes;
use serde_json::Value;

use common::*;

/// One route per line: the alias a client asks for, the model it is sent to, then its fallbacks;
/// `cached` caches its answers.
const ROUTES: &str = "
    claude                  anthropic/claude-sonnet
    claude-tokens           anthropic/tokens
    claude-cached           anthropic/cached            cached
    claude-failing-cached   anthropic/c-failing         cached
    claude-cut              anthropic/first-cut
    claude-overloaded       anthropic/first-overloaded  anthropic/second
    claude-failing          anthropic/first-failing     anthropic/second
    claude-refused          anthropic/first-refused     anthropic/second
    claude-down             anthropic/a-overloaded      anthropic/b-overloaded
    gpt                     openai/gpt
    gpt-tokens              openai/tokens
    gpt-trailing            openai/gpt-trailing
    gpt-cached              openai/cached               cached
    gpt-cut                 openai/first-cut
    gpt-overloaded          openai/first-overloaded     openai/second
    gpt-failing             openai/first-failing        openai/second
    sdk-claude              anthropic/sdk-claude
    sdk-claude-fallback     anthropic/sdk-overloaded    anthropic/sdk-backup
    sdk-claude-cut          anthropic/sdk-cut
    sdk-gpt                 openai/sdk-gpt
    sdk-gpt-fallback        openai/sdk-failing          openai/sdk-backup
    sdk-gpt-cut             openai/sdk-cut
";

fn config() -> String {
    let mut config =
        String::from("[fallback]\ncooldown = \"0s\"\n[server]\nmax_body_bytes = 20000\n");
    for line in ROUTES.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let (alias, model) = (words.next().unwrap(), words.next().unwrap());
        let (cached, fallbacks): (Vec<&str>, Vec<&str>) = words.partition(|w| *w == "cached");
        let cache = if cached.is_empty() {
            ""
        } else {
            "cache_ttl = \"10m\"\n"
        };
        config.push_str(&format!(
            "[[routes]]\nname = \"{alias}\"\nmatch = {{ model = \"{alias}\" }}\n\
             model = \"{model}\"\nfallbacks = {fallbacks:?}\n{cache}"
        ));
    }
    config
}

async fn start() -> (MockUpstream, TestProxy) {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, &config()).await;
    (upstream, proxy)
}

fn ask(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model, "max_tokens": 64, "stream": stream,
        "messages": [{"role": "user", "content": "hi"}]
    })
    .to_string()
}

fn ask_responses(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "input": "hi", "stream": stream}).to_string()
}

async fn post(
    proxy: &TestProxy,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    let (status, headers, bytes) = post_json(&proxy.url(path), body, headers).await;
    (status.as_u16(), headers, bytes)
}

fn cache(headers: &http::HeaderMap) -> &str {
    headers["x-cache"].to_str().unwrap()
}

/// The `data:` of the last event of an SSE body.
fn last_event(body: &[u8]) -> (Option<String>, Value) {
    let text = std::str::from_utf8(body).unwrap();
    let event = text.trim_end().rsplit("\n\n").next().unwrap();
    let name = event
        .lines()
        .find_map(|l| l.strip_prefix("event: "))
        .map(str::to_owned);
    let data = event
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    (name, serde_json::from_str(data).unwrap())
}

async fn tokens(proxy: &TestProxy, model: &str, kind: &str) -> Option<f64> {
    let series = format!(r#"openrouter_tokens_total{{model="{model}",type="{kind}"}}"#);
    proxy.metric(&series).await
}

#[tokio::test]
async fn messages_answers_and_streams_arrive_exactly_as_sent_and_are_counted() {
    let (upstream, proxy) = start().await;
    let (status, headers, body) = post(&proxy, "/v1/messages", &ask("claude", false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "anthropic/claude-sonnet");
    assert_eq!(body, anthropic_message("anthropic/claude-sonnet", TEXT));
    let (status, _, body) = post(&proxy, "/v1/messages", &ask("claude", true), &[]).await;
    assert_eq!(status, 200);
    let expected = anthropic_stream("anthropic/claude-sonnet").concat();
    assert_eq!(
        std::str::from_utf8(&body).unwrap(),
        expected,
        "nothing after message_stop"
    );
    assert_eq!(models_sent(&upstream), ["anthropic/claude-sonnet"; 2]);

    // Usage from message_start and message_delta: output tokens are the last value, not a sum.
    for stream in [false, true] {
        let (status, _, _) = post(&proxy, "/v1/messages", &ask("claude-tokens", stream), &[]).await;
        assert_eq!(status, 200);
    }
    let prompt = tokens(&proxy, "anthropic/tokens", "prompt").await;
    let completion = tokens(&proxy, "anthropic/tokens", "completion").await;
    assert_eq!(prompt, Some(2.0 * MESSAGES_PROMPT as f64));
    assert_eq!(completion, Some(2.0 * MESSAGES_OUTPUT as f64));
    let cost = proxy
        .metric(r#"openrouter_cost_usd_total{model="anthropic/tokens"}"#)
        .await
        .unwrap();
    assert!((cost - 0.0006).abs() < 1e-9, "{cost}");
}

#[tokio::test]
async fn messages_fall_back_before_content() {
    // 529, a 200 with an error body, an error event before the first content_block_delta.
    for (alias, stream) in [
        ("claude-overloaded", false),
        ("claude-overloaded", true),
        ("claude-failing", false),
        ("claude-failing", true),
    ] {
        let (upstream, proxy) = start().await;
        let (status, headers, body) = post(&proxy, "/v1/messages", &ask(alias, stream), &[]).await;
        assert_eq!(status, 200, "{alias} {stream}: {body:?}");
        assert_eq!(
            headers["x-proxy-model"], "anthropic/second",
            "{alias} {stream}"
        );
        let expected = if stream {
            anthropic_stream("anthropic/second").concat()
        } else {
            anthropic_message("anthropic/second", TEXT)
        };
        assert_eq!(std::str::from_utf8(&body).unwrap(), expected, "{alias}");
        let first = models_sent(&upstream)[0].clone();
        assert_eq!(models_sent(&upstream), [first.as_str(), "anthropic/second"]);
    }
    // The client's own error is not another model's business.
    let (upstream, proxy) = start().await;
    let (status, _, body) = post(&proxy, "/v1/messages", &ask("claude-refused", false), &[]).await;
    assert_eq!(status, 400);
    assert_eq!(body, anthropic_error("invalid_request_error"));
    assert_eq!(upstream.request_count(), 1);
}

/// Streams `opening` to the client, then breaks the upstream connection once the client has
/// read the first content (`Hello`); returns everything the client received.
async fn cut_after_content(path: &str, body: String, opening: Vec<String>) -> Bytes {
    let (upstream, proxy) = start().await;
    let (reply, tx, _closed) = stream_reply();
    upstream.push(reply);
    let headers = [("content-type", "application/json")];
    let response = send("POST", &proxy.url(path), &headers, body).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for event in &opening {
        tx.send(data(event)).await.unwrap();
    }
    let mut seen = read_until(&mut body, "Hello").await;
    tx.send(Step::Cut).await.unwrap();
    while let Some(data) = next_data(&mut body).await {
        seen.push_str(std::str::from_utf8(&data).unwrap());
    }
    assert!(seen.starts_with(&opening.concat()), "{seen}");
    Bytes::from(seen)
}

#[tokio::test]
async fn a_messages_stream_broken_after_content_ends_with_an_anthropic_error_event() {
    let (_upstream, proxy) = start().await;
    let (status, _, ended) = post(&proxy, "/v1/messages", &ask("claude-cut", true), &[]).await;
    assert_eq!(status, 200);
    let opening = anthropic_opening("anthropic/claude-sonnet");
    let cut = cut_after_content("/v1/messages", ask("claude", true), opening).await;
    for body in [ended, cut] {
        let (name, data) = last_event(&body);
        assert_eq!(name.as_deref(), Some("error"));
        assert_eq!(data["type"], "error");
        assert_eq!(data["error"]["type"], "api_error");
        let message = data["error"]["message"].as_str().unwrap();
        assert!(message.contains("upstream stream failed"), "{message}");
    }
}

#[tokio::test]
async fn the_proxys_own_errors_on_the_messages_path_are_anthropic_shaped() {
    let (upstream, proxy) = start().await;
    let cases = [
        ("{not json", 400, "invalid_request_error"),
        (
            r#"{"max_tokens":1,"messages":[]}"#,
            400,
            "invalid_request_error",
        ),
        (&"x".repeat(30_000), 413, "request_too_large"),
    ];
    for (body, status, kind) in cases {
        let (got, _, answer) = post(&proxy, "/v1/messages", body, &[]).await;
        assert_eq!(got, status, "{answer:?}");
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["error"]["type"], kind, "{answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    // Every model overloaded: the last status, Anthropic's type for it, the attempts listed.
    let (status, headers, body) =
        post(&proxy, "/v1/messages", &ask("claude-down", false), &[]).await;
    assert_eq!(status, 529);
    assert_eq!(headers["x-should-retry"], "false");
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["error"]["type"], "overloaded_error", "{answer}");
    assert_eq!(answer["error"]["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(upstream.request_count(), 2);
    // Chat completions keep OpenAI's shape.
    let (status, _, body) = post(&proxy, "/v1/chat/completions", "{not json", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(error_json(&body)["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn count_tokens_passes_through() {
    let (upstream, proxy) = start().await;
    let body = r#"{"model":"claude","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, answer) = post(&proxy, "/v1/messages/count_tokens", body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(answer, r#"{"input_tokens":12}"#);
    let sent = &upstream.requests()[0];
    assert_eq!(sent.path_and_query, "/api/v1/messages/count_tokens");
    assert_eq!(sent.json()["model"], "anthropic/claude-sonnet");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
}

#[tokio::test]
async fn messages_and_responses_answers_are_cached_and_replayed() {
    let (upstream, proxy) = start().await;
    let requests = [
        ("/v1/messages", ask("claude-cached", false)),
        ("/v1/messages", ask("claude-cached", true)),
        ("/v1/responses", ask_responses("gpt-cached", false)),
    ];
    for (path, body) in &requests {
        let (status, first_headers, first) = post(&proxy, path, body, &[]).await;
        assert_eq!((status, cache(&first_headers)), (200, "MISS"), "{body}");
        let (status, headers, again) = post(&proxy, path, body, &[]).await;
        assert_eq!((status, cache(&headers)), (200, "HIT"), "{body}");
        assert_eq!(again, first, "{body}");
        assert_eq!(headers["content-type"], first_headers["content-type"]);
    }
    assert_eq!(upstream.request_count(), 3);
    // An error answered with status 200 is never stored.
    for round in 0..2 {
        let body = ask("claude-failing-cached", false);
        let (status, headers, _) = post(&proxy, "/v1/messages", &body, &[]).await;
        assert_eq!((status, cache(&headers)), (200, "MISS"), "{round}");
    }
    assert_eq!(upstream.request_count(), 5);
}

#[tokio::test]
async fn responses_streams_end_exactly_at_response_completed_and_are_counted() {
    let (_upstream, proxy) = start().await;
    for (alias, model, trailing) in [
        ("gpt", "openai/gpt", ""),
        ("gpt-trailing", "openai/gpt-trailing", "data: [DONE]\n\n"),
    ] {
        let (status, _, body) =
            post(&proxy, "/v1/responses", &ask_responses(alias, true), &[]).await;
        assert_eq!(status, 200);
        let expected = responses_stream(model).concat() + trailing;
        assert_eq!(std::str::from_utf8(&body).unwrap(), expected, "{alias}");
    }
    for stream in [false, true] {
        let body = ask_responses("gpt-tokens", stream);
        let (status, _, _) = post(&proxy, "/v1/responses", &body, &[]).await;
        assert_eq!(status, 200);
    }
    let prompt = tokens(&proxy, "openai/tokens", "prompt").await;
    let completion = tokens(&proxy, "openai/tokens", "completion").await;
    assert_eq!(prompt, Some(2.0 * RESPONSES_INPUT as f64));
    assert_eq!(completion, Some(2.0 * RESPONSES_OUTPUT as f64));
}

#[tokio::test]
async fn responses_fall_back_before_output() {
    // A failed response, an error event, a 503, a 200 with a failed response object.
    for (alias, stream) in [
        ("gpt-failing", true),
        ("gpt-overloaded", true),
        ("gpt-overloaded", false),
        ("gpt-failing", false),
    ] {
        let (upstream, proxy) = start().await;
        let body = ask_responses(alias, stream);
        let (status, headers, answer) = post(&proxy, "/v1/responses", &body, &[]).await;
        assert_eq!(status, 200, "{alias} {stream}: {answer:?}");
        assert_eq!(
            headers["x-proxy-model"], "openai/second",
            "{alias} {stream}"
        );
        let expected = if stream {
            responses_stream("openai/second").concat()
        } else {
            responses_object("openai/second", TEXT)
        };
        assert_eq!(std::str::from_utf8(&answer).unwrap(), expected, "{alias}");
        assert_eq!(upstream.request_count(), 2);
    }
}

#[tokio::test]
async fn a_responses_stream_broken_after_output_ends_with_its_error_event() {
    let (_upstream, proxy) = start().await;
    let body = ask_responses("gpt-cut", true);
    let (status, _, ended) = post(&proxy, "/v1/responses", &body, &[]).await;
    assert_eq!(status, 200);
    let opening = responses_opening("openai/gpt");
    let cut = cut_after_content("/v1/responses", ask_responses("gpt", true), opening).await;
    for body in [ended, cut] {
        let (name, data) = last_event(&body);
        assert_eq!(name.as_deref(), Some("error"));
        assert_eq!(data["type"], "error");
        assert_eq!(data["code"], "upstream_stream_error");
        let message = data["message"].as_str().unwrap();
        assert!(message.contains("upstream stream failed"), "{message}");
    }
}

#[tokio::test]
async fn inject_mode_sends_the_proxys_key_alone() {
    let (upstream, proxy) = start().await;
    let credentials = [
        ("x-api-key", "sk-ant-client"),
        ("api-key", "azure-client"),
        ("authorization", "Bearer sk-or-client"),
    ];
    let (status, _, _) = post(&proxy, "/v1/messages", &ask("claude", false), &credentials).await;
    assert_eq!(status, 200);
    let sent = &upstream.requests()[0];
    assert_eq!(sent.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
    assert_eq!(sent.header("x-api-key"), None);
    assert_eq!(sent.header("api-key"), None);
}

#[tokio::test]
async fn pass_through_callers_with_x_api_key_are_served_and_cached_apart() {
    let upstream = MockUpstream::openai_like().await;
    let extra = format!("{}[upstream]\nauth = \"passthrough\"\n", config());
    let proxy = TestProxy::start(&upstream, &extra).await;
    let body = ask("claude-cached", false);
    let ask_as = |headers: &'static [(&'static str, &'static str)]| {
        let (proxy, body) = (&proxy, &body);
        async move { post(proxy, "/v1/messages", body, headers).await }
    };
    let (status, headers, _) = ask_as(&[("x-api-key", "sk-or-alice")]).await;
    assert_eq!((status, cache(&headers)), (200, "MISS"));
    let sent = &upstream.requests()[0];
    assert_eq!(sent.header("authorization"), Some("Bearer sk-or-alice"));
    assert_eq!(sent.header("x-api-key"), None);
    // The same key again, in either header, is the same tenant; another key is not.
    let (_, headers, _) = ask_as(&[("x-api-key", "sk-or-alice")]).await;
    assert_eq!(headers["x-cache"], "HIT");
    let (_, headers, _) = ask_as(&[("authorization", "Bearer sk-or-alice")]).await;
    assert_eq!(headers["x-cache"], "HIT");
    let (_, headers, _) = ask_as(&[("x-api-key", "sk-or-bob")]).await;
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(
        upstream.requests()[1].header("authorization"),
        Some("Bearer sk-or-bob")
    );
    // Without any key: Anthropic's authentication error.
    let (status, _, answer) = ask_as(&[]).await;
    assert_eq!(status, 401);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["error"]["type"], "authentication_error", "{answer}");
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn official_anthropic_sdk() {
    let (upstream, proxy) = start().await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/anthropic_python.py"));
    run_client(command, &proxy).await;
    let sent = upstream.requests();
    assert!(!sent.is_empty());
    for request in &sent {
        assert_eq!(request.header("x-api-key"), None, "the client's key leaked");
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {TEST_KEY}").as_str())
        );
        assert!(request.header("anthropic-version").is_some());
    }
    let completion = tokens(&proxy, "anthropic/sdk-claude", "completion").await;
    assert_eq!(completion, Some(2.0 * MESSAGES_OUTPUT as f64));
}

#[tokio::test]
async fn official_openai_sdk_responses() {
    let (_upstream, proxy) = start().await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/responses_python.py"));
    run_client(command, &proxy).await;
    let prompt = tokens(&proxy, "openai/sdk-gpt", "prompt").await;
    assert_eq!(prompt, Some(3.0 * RESPONSES_INPUT as f64));
}
