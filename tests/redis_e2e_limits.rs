//! Limits of two replicas of the real binary sharing one real `redis-server`: a route's and a
//! token's `requests_per_minute` hold for the sum of both replicas, and spend recorded through
//! one replica (from the answers' `usage.cost`, streamed or not) exhausts a budget on both.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::redis::RedisServer;
use common::replicas::{
    chat, chat_body, header, replica_config, start_pair, stop, token_hash, wait_metric,
};
use common::{chat_completion, error_json, labelled, openai_like_reply, MockUpstream, Reply};

const STEADY: &str = "5s";
/// The rate limit below: a burst of N, then one request per 60/N s.
const N: usize = 10;

fn config(n: usize) -> String {
    format!(
        "[[server.tokens]]\nname = \"free\"\nsha256 = \"{free}\"\n\
         [[server.tokens]]\nname = \"metered\"\nsha256 = \"{metered}\"\nrequests_per_minute = {n}\n\
         [[server.tokens]]\nname = \"spender\"\nsha256 = \"{spender}\"\nbudget = {{ usd_per_day = 0.0004 }}\n\
         [[routes]]\nname = \"limited\"\nmatch = {{ model = \"limited\" }}\nmodel = \"m\"\nrequests_per_minute = {n}\n\
         [[routes]]\nname = \"budgeted\"\nmatch = {{ model = \"budgeted\" }}\nmodel = \"pricey\"\n\
         budget = {{ usd_per_day = 1.0, usd_per_month = 100.0 }}\n\
         [[routes]]\nname = \"open\"\nmatch = {{ model = \"open\" }}\nmodel = \"m\"\n",
        free = token_hash("token-free"),
        metered = token_hash("token-metered"),
        spender = token_hash("token-spender"),
    )
}

/// The mock: OpenRouter-like answers, which cost 1 USD for the model `pricey`.
async fn upstream() -> MockUpstream {
    MockUpstream::start(|request| {
        if request.json()["model"] == "pricey" {
            let body = chat_completion("pricey", "dear").replace("0.0001", "1.0");
            return Reply::Json(200, body);
        }
        openai_like_reply(request)
    })
    .await
}

/// Sends N + 10 requests for `model` with `token`, alternately to A and B, and checks that N or
/// N + 1 were admitted and every other one refused with 429, `rate_limit_exceeded` and
/// `Retry-After`, on both replicas.
async fn spread(replicas: [&common::BinaryProxy; 2], model: &str, token: &str) {
    let auth = format!("Bearer {token}");
    let (mut admitted, mut refused_on) = (0, [0, 0]);
    for i in 0..N + 10 {
        let body = chat_body(model, &format!("request {i}"), false);
        let (status, headers, body) =
            chat(replicas[i % 2], &body, &[("authorization", &auth)]).await;
        match status.as_u16() {
            200 => admitted += 1,
            429 => {
                refused_on[i % 2] += 1;
                let error = error_json(&body);
                assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");
                let retry: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "Retry-After: {retry}");
            }
            other => panic!("{model}: unexpected status {other}"),
        }
    }
    assert!(
        admitted == N || admitted == N + 1,
        "{model} with {token}: {admitted} of {} admitted across both replicas",
        N + 10
    );
    assert!(
        refused_on.iter().all(|&n| n > 0),
        "both replicas refuse: {refused_on:?}"
    );
}

#[tokio::test]
async fn request_rates_of_routes_and_tokens_hold_for_the_sum_of_the_replicas() {
    let server = RedisServer::start().await;
    let upstream = upstream().await;
    let path = replica_config(&server, &upstream.url(), STEADY, &config(N));
    let (a, b) = start_pair(&path).await;
    spread([&a, &b], "limited", "token-free").await;
    spread([&b, &a], "open", "token-metered").await;
    // Each scope has its own allowance: the free token on the open route is not limited.
    let body = chat_body("open", "unlimited", false);
    let (status, _, _) = chat(&a, &body, &[("authorization", "Bearer token-free")]).await;
    assert_eq!(status, 200);
    stop(a).await;
    stop(b).await;
}

fn spent(text: &str, scope: &str, name: &str) -> f64 {
    let labels = [("scope", scope), ("name", name), ("period", "day")];
    labelled(text, "openrouter_budget_spent_usd", &labels).unwrap_or(0.0)
}

/// Asserts a 429 `budget_exceeded` naming the budget, with a `Retry-After` up to the next UTC
/// midnight.
fn assert_over_budget(
    (status, headers, body): (http::StatusCode, http::HeaderMap, bytes::Bytes),
    budget: &str,
) {
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    let error = error_json(&body);
    assert_eq!(error["error"]["code"], "budget_exceeded", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(budget) && message.contains("T00:00:00Z"),
        "{message}"
    );
    let retry: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "Retry-After: {retry}");
}

#[tokio::test]
async fn spend_recorded_through_one_replica_exhausts_the_budget_on_both() {
    let server = RedisServer::start().await;
    let upstream = upstream().await;
    let path = replica_config(&server, &upstream.url(), STEADY, &config(N));
    let (a, b) = start_pair(&path).await;
    let auth = [("authorization", "Bearer token-free")];

    let body = chat_body("budgeted", "what does it cost?", false);
    let (status, _, _) = chat(&a, &body, &auth).await;
    assert_eq!(status, 200);
    // The spend is added off the response path.
    wait_metric(&a, "the route's spend", |m| {
        spent(m, "route", "budgeted") >= 1.0
    })
    .await;
    assert_over_budget(chat(&b, &body, &auth).await, "daily budget of 1.00 USD");
    assert_over_budget(chat(&a, &body, &auth).await, "daily budget of 1.00 USD");
    let pricey = upstream
        .requests()
        .iter()
        .filter(|r| r.json()["model"] == "pricey")
        .count();
    assert_eq!(pricey, 1, "refused requests never went upstream");

    // A stream's cost arrives in its last usage event (0.00042 USD from the mock).
    let auth = [("authorization", "Bearer token-spender")];
    let stream = serde_json::json!({
        "model": "open", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "a streamed spend"}],
    })
    .to_string();
    let (status, _, _) = chat(&b, &stream, &auth).await;
    assert_eq!(status, 200);
    wait_metric(&b, "the token's spend", |m| {
        spent(m, "token", "spender") > 0.0004
    })
    .await;
    let body = chat_body("open", "one more", false);
    assert_over_budget(chat(&a, &body, &auth).await, "daily budget of 0.0004 USD");
    stop(a).await;
    stop(b).await;
}
