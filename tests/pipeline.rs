//! The pipeline's internal entry: a request the proxy makes itself (a batch line) runs through the
//! same routing, model rewrite, cache and attempts as a client's, with no inbound connection.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use openrouter_proxy::pipeline::{execute, InternalRequest, Shared};
use openrouter_proxy::runtime::Runtime;

fn shared_for(upstream: &MockUpstream, extra: &str) -> Shared {
    let key = temp_file("key", TEST_KEY);
    let base = format!(
        "[upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        upstream.url(),
        key.display()
    );
    let config = openrouter_proxy::Config::parse(&merge_toml(&base, extra)).unwrap();
    Shared::new(Runtime::build(config, None).unwrap()).unwrap()
}

fn chat(model: &str) -> InternalRequest {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    InternalRequest {
        method: Method::POST,
        path: "/v1/chat/completions".into(),
        headers,
        body: format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
            .into(),
        token: None,
    }
}

async fn body_of(
    response: http::Response<openrouter_proxy::pipeline::relay::ProxyBody>,
) -> (u16, HeaderMap, serde_json::Value) {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        serde_json::from_slice(&bytes).unwrap(),
    )
}

#[tokio::test]
async fn an_internal_request_is_routed_rewritten_cached_and_answered() {
    let upstream = MockUpstream::openai_like().await;
    let routes = "[[routes]]\nname = \"fast\"\nmatch = { model = \"fast\" }\nmodel = \"openai/gpt-4o-mini\"\ncache_ttl = \"1m\"\n";
    let shared = shared_for(&upstream, routes);
    let (status, headers, answer) = body_of(execute(&shared, chat("fast")).await).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "openai/gpt-4o-mini");
    assert_eq!(headers["x-cache"], "MISS");
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock"
    );
    let sent = upstream.requests();
    assert_eq!(sent[0].json()["model"], "openai/gpt-4o-mini");
    assert_eq!(
        sent[0].header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
    // The same request again is a hit, with no upstream call.
    let (status, headers, _) = body_of(execute(&shared, chat("fast")).await).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn an_internal_request_gets_the_errors_a_client_would() {
    let upstream = MockUpstream::openai_like().await;
    let shared = shared_for(&upstream, "");
    let mut request = chat("m");
    request.body = r#"{"messages":[]}"#.into();
    let (status, _, answer) = body_of(execute(&shared, request).await).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["code"], "missing_model");
    let mut request = chat("m");
    request.path = "/v2/x".into();
    let (status, _, answer) = body_of(execute(&shared, request).await).await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "unknown_path");
    let mut request = chat("m");
    request.token = Some("nobody".into());
    let (status, _, _) = body_of(execute(&shared, request).await).await;
    assert_eq!(status, 401);
    assert_eq!(upstream.request_count(), 0);
}
