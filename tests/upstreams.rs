//! Several upstreams over real sockets: fallback from the default upstream to a named one (the
//! official OpenAI Python SDK as the client), key pools (402, 429), balanced endpoints with one
//! killed under load, the body policy as the upstream sees it, `explain`, and bad configs.
//!
//! Metrics and the log subscriber are process-wide: every test names its own upstreams, keys and
//! routes, so the series one test reads are its own.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(
    clippy::too_many_lines,
    reason = "each scenario reads top to bottom: set-up, fault, then every check of its outcome"
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::Value;

const CHAT: &str = "/v1/chat/completions";

fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    })
    .to_string()
}

fn text(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The route "smart": `first` on the default upstream, then `last` on `[upstreams.backup]`.
fn backup_config(default_url: &str, backup_url: &str, first: &str, last: &str) -> String {
    proxy_config(&format!(
        r#"
[upstream]
base_url = "{default_url}"
api_key_file = "{key}"

[upstreams.backup]
base_url = "{backup_url}"
auth = "none"

[[routes]]
name = "smart"
match = {{ model = "smart" }}
model = "{first}"
fallbacks = [{{ upstream = "backup", model = "{last}" }}]
"#,
        key = key_file(TEST_KEY)
    ))
}

// ---------------------------------------------------------------------------------------------
// fallback across upstreams

#[tokio::test]
async fn the_python_sdk_is_answered_by_the_backup_when_openrouter_is_down() {
    let backup = MockUpstream::openai_like().await;
    let proxy = TestProxy::start_with_config(&backup_config(
        &refused_url(),
        &backup.url(),
        "anthropic/claude-sonnet-4",
        "llama-local",
    ))
    .await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/upstreams_python.py"));
    run_client(command, &proxy).await;

    let sent = backup.requests();
    assert_eq!(sent.len(), 2, "chat and stream, once each");
    for request in &sent {
        assert_eq!(request.json()["model"], "llama-local");
        assert_eq!(
            request.header("authorization"),
            None,
            "auth = \"none\" sends no key"
        );
    }
    assert_eq!(sent[1].json()["stream"], true);
}

#[tokio::test]
async fn a_killed_default_upstream_falls_back_to_the_backup_streaming_and_not() {
    let openrouter = KillableUpstream::start(openai_like_reply).await;
    let backup = MockUpstream::openai_like().await;
    let (first, last) = ("anthropic/claude-killed", "llama-killed");
    let config = backup_config(&openrouter.url(), &backup.url(), first, last);
    let proxy = TestProxy::start_with_config(&config).await;

    let (status, headers, _) = post_json(&proxy.url(CHAT), &chat_body("smart", false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(text(&headers, "x-proxy-upstream"), "default");
    assert_eq!(text(&headers, "x-proxy-model"), first);
    assert_eq!(openrouter.request_count(), 1);

    openrouter.kill().await;
    // Three failures in a row (fallback.cooldown_failures) put the first model in cool-down.
    for stream in [false, true, false] {
        let (status, headers, body) =
            post_json(&proxy.url(CHAT), &chat_body("smart", stream), &[]).await;
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(text(&headers, "x-proxy-upstream"), "backup");
        assert_eq!(text(&headers, "x-proxy-model"), last);
        if stream {
            assert!(body.contains("\"content\":\" mock\""), "{body}");
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        } else {
            let answer: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                answer["choices"][0]["message"]["content"],
                "Hello from the mock"
            );
            assert_eq!(answer["model"], last);
        }
    }
    assert_eq!(backup.request_count(), 3);
    assert_eq!(
        openrouter.request_count(),
        1,
        "nothing reached the dead one"
    );

    let metrics = scrape_metrics(proxy.admin).await;
    let attempts = |upstream, model, outcome| {
        labelled(
            &metrics,
            "openrouter_upstream_attempts_total",
            &[
                ("upstream", upstream),
                ("model", model),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(attempts("default", first, "answered"), Some(1.0));
    assert_eq!(attempts("backup", last, "answered"), Some(3.0));
    assert_eq!(attempts("backup", first, "answered"), None);
    let failed: f64 = ["connect_error", "upstream_error"]
        .iter()
        .filter_map(|outcome| attempts("default", first, outcome))
        .sum();
    assert_eq!(failed, 3.0, "every failure counted on the dead upstream");
    let cooling = labelled(
        &metrics,
        "openrouter_model_cooldown",
        &[("upstream", "default"), ("model", first)],
    );
    assert_eq!(cooling, Some(1.0));
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// key pools

const KEY_A: &str = "sk-or-pool-a-0f1e2d3c4b5a69788796";
const KEY_B: &str = "sk-or-pool-b-a5b4c3d2e1f001122334";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The Authorization each request the mock received carried.
fn keys_seen(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap_or("").to_owned())
        .collect()
}

/// Sends chat requests for `model` one after another (ids `<prefix>-<n>`), each answered 200,
/// until the mock has received `key`; returns how many were sent.
async fn send_until_key_used(
    proxy: &TestProxy,
    upstream: &MockUpstream,
    model: &str,
    key: &str,
    prefix: &str,
) -> usize {
    // Keys of equal weight: each request picks the one in question with even odds, so 64 in a
    // row without it would take odds of 2^-64.
    for n in 0..64 {
        let id = format!("{prefix}-{n}");
        let (status, headers, body) = post_json(
            &proxy.url(CHAT),
            &chat_body(model, false),
            &[("x-request-id", &id)],
        )
        .await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(
            text(&headers, "x-proxy-attempts"),
            "1",
            "a key swap is no fallback"
        );
        if keys_seen(upstream).contains(&bearer(key)) {
            return n + 1;
        }
    }
    panic!("64 requests and {key} was never chosen");
}

fn assert_no_key_values(text: &str, what: &str) {
    for key in [KEY_A, KEY_B, TEST_KEY] {
        assert!(!text.contains(key), "a key value reached {what}");
    }
}

/// An OpenRouter-like mock that answers `status` (with `headers`) to the requests `refused` picks.
async fn refusing(
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    refused: impl Fn(&Recorded) -> bool + Send + Sync + 'static,
) -> MockUpstream {
    MockUpstream::start(move |request| {
        if refused(request) {
            let error = serde_json::json!({"error": {"message": "refused", "code": status}});
            Reply::Headers(
                headers.clone(),
                Box::new(Reply::Json(status, error.to_string())),
            )
        } else {
            openai_like_reply(request)
        }
    })
    .await
}

fn with_key(key: &'static str) -> impl Fn(&Recorded) -> bool {
    move |request| request.header("authorization") == Some(bearer(key).as_str())
}

/// `keys = [...]`: a pool of KEY_A and KEY_B, named `a` and `b`, each in a file.
fn pool_of_two(a: &str, b: &str) -> String {
    format!(
        "keys = [{{ name = \"{a}\", file = \"{}\" }}, {{ name = \"{b}\", file = \"{}\" }}]",
        key_file(KEY_A),
        key_file(KEY_B)
    )
}

#[tokio::test]
async fn a_key_out_of_credit_is_replaced_by_the_next_key() {
    captured_logs();
    let upstream = refusing(402, vec![], with_key(KEY_A)).await;
    let config = proxy_config(&format!(
        "[upstream]\nbase_url = \"{}\"\n{}\n\n[fallback]\ncooldown = \"10m\"\n",
        upstream.url(),
        pool_of_two("a", "b")
    ));
    let proxy = TestProxy::start_with_config(&config).await;
    let metrics = scrape_metrics(proxy.admin).await;
    let up = |metrics: &str, key| {
        labelled(
            metrics,
            "openrouter_upstream_key_up",
            &[("upstream", "default"), ("key", key)],
        )
    };
    assert_eq!(
        (up(&metrics, "a"), up(&metrics, "b")),
        (Some(1.0), Some(1.0))
    );

    let sent = send_until_key_used(&proxy, &upstream, "pool/credit", KEY_A, "up-402").await;
    let seen = keys_seen(&upstream);
    let refused = seen.iter().position(|k| *k == bearer(KEY_A)).unwrap();
    assert_eq!(seen.len(), sent + 1, "one request went out twice: {seen:?}");
    assert_eq!(
        seen[refused + 1],
        bearer(KEY_B),
        "the same request, with key b"
    );
    let line = access_log_line(&format!("up-402-{}", sent - 1)).await;
    assert_eq!(
        (line["upstream"].as_str(), line["key"].as_str()),
        (Some("default"), Some("b"))
    );
    assert_eq!(line["status"], 200);

    let metrics = scrape_metrics(proxy.admin).await;
    assert_eq!(
        (up(&metrics, "a"), up(&metrics, "b")),
        (Some(0.0), Some(1.0))
    );

    // Key a stays out for the cool-down: every later request goes out with key b.
    let before = upstream.request_count();
    for n in 0..8 {
        let id = format!("up-402-after-{n}");
        let (status, _, _) = post_json(
            &proxy.url(CHAT),
            &chat_body("pool/credit", false),
            &[("x-request-id", &id)],
        )
        .await;
        assert_eq!(status, 200);
        let line = access_log_line(&id).await;
        assert_eq!(line["key"], "b", "{line}");
        assert_eq!(line["upstream"], "default", "{line}");
    }
    assert_eq!(keys_seen(&upstream)[before..], vec![bearer(KEY_B); 8]);

    assert_no_key_values(&scrape_metrics(proxy.admin).await, "/metrics");
    assert_no_key_values(&captured_logs(), "the logs");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_rate_limited_key_moves_to_another_key() {
    let upstream = refusing(429, vec![("retry-after", "600")], with_key(KEY_A)).await;
    let config = proxy_config(&format!(
        r#"
[upstream]
base_url = "{url}"
api_key_file = "{default_key}"

[upstreams.pool]
base_url = "{url}"
{pool}

[fallback]
cooldown = "10m"

[[routes]]
name = "pooled"
match = {{ model = "pooled" }}
model = "pool/model"
upstream = "pool"
"#,
        url = upstream.url(),
        default_key = key_file(TEST_KEY),
        pool = pool_of_two("rl-a", "rl-b")
    ));
    let proxy = TestProxy::start_with_config(&config).await;
    send_until_key_used(&proxy, &upstream, "pooled", KEY_A, "up-429").await;
    let seen = keys_seen(&upstream);
    let limited = seen.iter().position(|k| *k == bearer(KEY_A)).unwrap();
    assert_eq!(seen[limited + 1], bearer(KEY_B));
    let metrics = scrape_metrics(proxy.admin).await;
    let up = |key| {
        labelled(
            &metrics,
            "openrouter_upstream_key_up",
            &[("upstream", "pool"), ("key", key)],
        )
    };
    assert_eq!(
        (up("rl-a"), up("rl-b")),
        (Some(0.0), Some(1.0)),
        "out for its Retry-After"
    );

    let before = upstream.request_count();
    for _ in 0..5 {
        let (status, headers, _) =
            post_json(&proxy.url(CHAT), &chat_body("pooled", false), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(text(&headers, "x-proxy-upstream"), "pool");
    }
    assert_eq!(keys_seen(&upstream)[before..], vec![bearer(KEY_B); 5]);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_rate_limited_on_every_key_falls_back_to_the_next_model() {
    let upstream = refusing(429, vec![], |r| r.json()["model"] == "lim/busy").await;
    let config = proxy_config(&format!(
        r#"
[upstream]
base_url = "{url}"
{pool}

[[routes]]
name = "limited"
match = {{ model = "limited" }}
model = "lim/busy"
fallbacks = ["lim/spare"]
"#,
        url = upstream.url(),
        pool = pool_of_two("lim-a", "lim-b")
    ));
    let proxy = TestProxy::start_with_config(&config).await;
    let (status, headers, _) = post_json(&proxy.url(CHAT), &chat_body("limited", false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(text(&headers, "x-proxy-model"), "lim/spare");
    assert_eq!(text(&headers, "x-proxy-attempts"), "2");
    let sent: Vec<(String, String)> = upstream
        .requests()
        .iter()
        .map(|r| {
            let model = r.json()["model"].as_str().unwrap().to_owned();
            (model, r.header("authorization").unwrap().to_owned())
        })
        .collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(
        (sent[0].0.as_str(), sent[1].0.as_str()),
        ("lim/busy", "lim/busy")
    );
    assert_ne!(sent[0].1, sent[1].1, "the second try used the other key");
    assert_eq!(sent[2].0, "lim/spare");
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// endpoints

#[tokio::test]
async fn an_endpoint_killed_under_load_costs_no_request() {
    let first = KillableUpstream::start(openai_like_reply).await;
    let second = Arc::new(KillableUpstream::start(openai_like_reply).await);
    let config = proxy_config(&format!(
        r#"
[upstream]
endpoints = ["{}", "{}"]
api_key_file = "{}"
"#,
        first.url(),
        second.url(),
        key_file(TEST_KEY)
    ));
    let proxy = Arc::new(TestProxy::start_with_config(&config).await);
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let answered_after_kill = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (proxy, stop, killed) = (proxy.clone(), stop.clone(), killed.clone());
        let after = answered_after_kill.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut answered = 0;
            while !stop.load(Ordering::SeqCst) {
                let started_after_kill = killed.load(Ordering::SeqCst);
                let (status, headers, body) =
                    post_json(&proxy.url(CHAT), &chat_body("spread/model", false), &[]).await;
                if status != 200 {
                    failures.push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                } else {
                    assert_eq!(text(&headers, "x-proxy-upstream"), "default");
                    answered += 1;
                    if started_after_kill {
                        after.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            (answered, failures)
        }));
    }
    wait_until("both endpoints to take traffic", || {
        first.request_count() >= 10 && second.request_count() >= 10
    })
    .await;
    first.kill().await;
    let first_at_kill = first.request_count();
    let second_at_kill = second.request_count();
    killed.store(true, Ordering::SeqCst);
    wait_until("the other endpoint to take the load", || {
        second.request_count() >= second_at_kill + 100
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut answered = 0;
    for worker in workers {
        let (n, failures) = worker.await.unwrap();
        assert!(failures.is_empty(), "client errors: {failures:?}");
        answered += n;
    }
    assert!(answered >= 120, "{answered}");
    assert_eq!(first.request_count(), first_at_kill);
    let after = answered_after_kill.load(Ordering::SeqCst);
    assert!(after >= 96, "{after} answered after the kill");
    assert!(
        second.request_count() - second_at_kill >= after,
        "every request sent after the kill was answered by the live endpoint"
    );
}

#[tokio::test]
async fn an_endpoint_answering_5xx_is_ejected() {
    let failing = MockUpstream::start(|_| {
        Reply::Json(
            503,
            r#"{"error":{"message":"overloaded","code":503}}"#.to_owned(),
        )
    })
    .await;
    let healthy = MockUpstream::openai_like().await;
    let config = proxy_config(&format!(
        r#"
[upstream]
endpoints = ["{}", "{}"]
api_key_file = "{}"

[fallback]
cooldown = "1h"
"#,
        failing.url(),
        healthy.url(),
        key_file(TEST_KEY)
    ));
    let proxy = TestProxy::start_with_config(&config).await;
    // Even odds for the failing endpoint on each request until it has answered once.
    for _ in 0..64 {
        let (status, _, _) =
            post_json(&proxy.url(CHAT), &chat_body("eject/model", false), &[]).await;
        if failing.request_count() == 1 {
            assert_eq!(
                status, 503,
                "a response head is the answer of a single-model route"
            );
            break;
        }
        assert_eq!(status, 200);
    }
    assert_eq!(
        failing.request_count(),
        1,
        "64 requests and never the failing endpoint"
    );
    let before = healthy.request_count();
    for _ in 0..20 {
        let (status, _, _) =
            post_json(&proxy.url(CHAT), &chat_body("eject/model", false), &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(failing.request_count(), 1, "ejected for the cool-down");
    assert_eq!(healthy.request_count(), before + 20);
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// body policy

const POLICY: &str = r#"
[[routes]]
name = "policy"
match = { model = "policy" }
model = "policy/model"
cache_ttl = "10m"
set_body = { provider = { data_collection = "deny", zdr = true }, temperature = 0 }
default_body = { max_tokens = 100, top_p = 1 }
unset_body = ["logit_bias"]
"#;

/// The raw bytes of the top-level field `name` of a JSON object.
fn raw_field(body: &[u8], name: &str) -> String {
    let fields: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_slice(body).unwrap();
    fields[name].get().to_owned()
}

#[tokio::test]
async fn the_body_policy_as_the_upstream_sees_it() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, POLICY).await;
    // Odd spacing, escapes and key order in messages: they reach the upstream as they were sent.
    let messages = r#"[ {"content":"h\u00e9llo { \"x\": 1 }",  "role":"user"} ,{"role":"assistant","content":"ok\n"}]"#;
    let client_body = format!(
        r#"{{"model":"policy","messages":{messages},"provider":{{"order":["a","b"],"zdr":false}},"logit_bias":{{"50256":-100}},"top_p":0.5}}"#
    );
    let (status, headers, _) = post_json(&proxy.url(CHAT), &client_body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(text(&headers, "x-cache"), "MISS");
    let sent = upstream.requests();
    let body = &sent[0].body;
    assert_eq!(
        raw_field(body, "messages"),
        messages,
        "messages byte for byte"
    );
    let json = sent[0].json();
    assert_eq!(json["model"], "policy/model");
    assert_eq!(
        json["provider"],
        serde_json::json!({"order": ["a", "b"], "zdr": true, "data_collection": "deny"}),
        "set_body merged into the client's object"
    );
    assert_eq!(json["temperature"], 0, "set_body adds what is absent");
    assert!(json.get("logit_bias").is_none(), "unset_body removed it");
    assert_eq!(
        json["top_p"], 0.5,
        "the client's value wins over default_body"
    );
    assert_eq!(json["max_tokens"], 100, "default_body fills what is absent");

    // The cache key is the patched body's: a request that differs only in what the policy
    // overrides or removes is the same request upstream, and a hit.
    let same_once_patched = format!(
        r#"{{"model":"policy","messages":{messages},"provider":{{"order":["a","b"],"zdr":true}},"logit_bias":{{"1":1}},"top_p":0.5}}"#
    );
    let (status, headers, _) = post_json(&proxy.url(CHAT), &same_once_patched, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(text(&headers, "x-cache"), "HIT");
    assert_eq!(
        text(&headers, "x-proxy-upstream"),
        "default",
        "replayed with the answer"
    );
    let other_messages = client_body.replace("ok\\n", "ok, and more");
    let (status, headers, _) = post_json(&proxy.url(CHAT), &other_messages, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(text(&headers, "x-cache"), "MISS");
    assert_eq!(upstream.request_count(), 2);
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// explain

const EXPLAINED: &str = r#"
[upstream]
api_key_env = "EXPLAIN_OR_KEY"

[upstreams.local]
endpoints = ["http://vllm-0.vllm:8000/v1", "http://vllm-1.vllm:8000/v1"]
auth = "none"

[[routes]]
name = "smart"
match = { model = "smart" }
model = "anthropic/claude-sonnet-4"
fallbacks = ["openai/gpt-4o", { upstream = "local", model = "llama-3.1-8b-instruct" }]
set_body = { provider = { data_collection = "deny" } }
unset_body = ["logit_bias"]
cache_ttl = "5m"

[[routes]]
name = "team-a"
match = { model = "openai/*", headers = { "x-team" = "a" } }
set_headers = { "X-Title" = "team-a" }
remove_headers = ["x-team"]
max_concurrent = 5
"#;

const EXPLAIN_KEY: &str = "sk-or-explain-7a6b5c4d3e2f1a0b";

#[tokio::test]
async fn explain_prints_the_plan_of_each_rule() {
    let env = [("EXPLAIN_OR_KEY", EXPLAIN_KEY)];
    let (code, out, err) = explain(EXPLAINED, &["--model", "smart"], &env).await;
    assert_eq!(code, 0, "{err}");
    let expected = [
        "request: POST /v1/chat/completions model=smart",
        "route: smart (rule 1 of 2)",
        "attempts:",
        "  1. default / anthropic/claude-sonnet-4  [https://openrouter.ai/api/v1; keys: default;",
        "  2. default / openai/gpt-4o  [https://openrouter.ai/api/v1; keys: default;",
        "  3. local / llama-3.1-8b-instruct  [http://vllm-0.vllm:8000/v1, http://vllm-1.vllm:8000/v1; keys: none;",
        r#"body: {"default_body":{},"set_body":{"provider":{"data_collection":"deny"}},"unset_body":["logit_bias"]}"#,
        "cache: 5m",
    ];
    for line in expected {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }

    let (code, out, err) = explain(
        EXPLAINED,
        &["--model", "openai/gpt-4o-mini", "--header", "x-team=a"],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    for line in [
        "route: team-a (rule 2 of 2)",
        "  1. default / openai/gpt-4o-mini  [",
        "headers set: x-title",
        "headers removed: x-team",
        "body: unchanged but for the model",
        "cache: off",
        "limits: 5 in flight, none per minute",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    assert!(!out.contains("  2. "), "one attempt only:\n{out}");

    let (code, out, err) = explain(
        EXPLAINED,
        &["--model", "openai/gpt-4o-mini", "--path", "/v1/embeddings"],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    for line in [
        "request: POST /v1/embeddings model=openai/gpt-4o-mini",
        "route: default (no rule matched: passed through unchanged)",
        "  1. default / openai/gpt-4o-mini  [",
        "headers set: none",
        "headers removed: none",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }

    let broken = EXPLAINED.replace("upstream = \"local\"", "upstream = \"nowhere\"");
    let (code, out, err) = explain(&broken, &["--model", "smart"], &env).await;
    assert_ne!(code, 0, "an invalid config must fail: {out}");
    assert!(out.is_empty(), "{out}");
    let line = broken
        .lines()
        .position(|l| l.contains("\"nowhere\""))
        .unwrap()
        + 1;
    for needle in [
        "routes[0].fallbacks[1].upstream",
        "route \"smart\"",
        "no upstream is named \"nowhere\"",
        &format!("line {line}"),
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// bad configs

/// Each bad config, and what its error must name: the route or upstream, the key and the line.
fn bad_configs(good: &str) -> Vec<(String, Vec<&'static str>)> {
    let unknown_upstream = format!(
        "{good}\n[[routes]]\nname = \"lost\"\nmatch = {{ model = \"lost\" }}\nupstream = \"nowhere\"\n"
    );
    let both = format!(
        "{good}\n[upstreams.twice]\nbase_url = \"http://127.0.0.1:1/v1\"\n\
         endpoints = [\"http://127.0.0.1:2/v1\"]\nauth = \"none\"\n"
    );
    let keyless = good.replace(
        "[upstream]\n",
        "[upstreams.pooled]\nkeys = [{ name = \"ok\", env = \"X\" }, { name = \"nowhere\" }]\n\n[upstream]\n",
    );
    let not_a_table = format!("{good}\n[[routes]]\nname = \"patchy\"\nset_body = [\"provider\"]\n");
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let lines = [
        line_of(&unknown_upstream, "upstream = \"nowhere\""),
        line_of(&both, "endpoints ="),
        line_of(&keyless, "keys = ["),
        line_of(&not_a_table, "set_body ="),
    ];
    let leak = |n: usize| -> &'static str { Box::leak(format!("line {n}").into_boxed_str()) };
    vec![
        (
            unknown_upstream,
            vec![
                "route \"lost\"",
                "upstream",
                "no upstream is named \"nowhere\"",
                leak(lines[0]),
            ],
        ),
        (
            both,
            vec!["upstreams.twice.endpoints", "not both", leak(lines[1])],
        ),
        (
            keyless,
            vec!["upstreams.pooled.keys[1]", "env", "file", leak(lines[2])],
        ),
        (
            not_a_table,
            vec![
                "route \"patchy\"",
                "set_body",
                "must be a table",
                leak(lines[3]),
            ],
        ),
    ]
}

fn good_config(upstream: &MockUpstream) -> String {
    proxy_config(&format!(
        "[upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\n\
         [[routes]]\nname = \"alias\"\nmatch = {{ model = \"alias\" }}\nmodel = \"model-1\"\n",
        upstream.url(),
        key_file(TEST_KEY)
    ))
}

#[tokio::test]
async fn bad_configs_are_rejected_with_the_route_or_upstream_the_key_and_the_line() {
    let upstream = MockUpstream::openai_like().await;
    for (text, needles) in bad_configs(&good_config(&upstream)) {
        let path = temp_file("proxy.toml", &text);
        let error = openrouter_proxy::Config::load(&path)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(&path.display().to_string()), "{error}");
        for needle in needles {
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
        }
    }
}

/// `/config` of the admin listener, once `done` holds for it.
async fn config_when(proxy: &TestProxy, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let url = proxy.admin_url("/config");
    let polled = tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, _, body) = read_all(send("GET", &url, &[], "").await).await;
            let config: Value = serde_json::from_slice(&body).unwrap();
            if done(&config) {
                return config;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_config_serving() {
    let upstream = MockUpstream::openai_like().await;
    let good = good_config(&upstream);
    let path = temp_file("proxy.toml", &good);
    let (proxy, _) = start_live_proxy(&path).await;
    for (text, needles) in bad_configs(&good) {
        // Renamed over the file, as editors and the kubelet do: never a half-written file.
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, &text).unwrap();
        std::fs::rename(&temp, &path).unwrap();
        let config = config_when(&proxy, "the edit to be rejected", |c| {
            let error = c["last_error"].as_str().unwrap_or("");
            needles.iter().all(|needle| error.contains(needle))
        })
        .await;
        assert!(
            config["reloads"]["error"].as_u64().unwrap() >= 1,
            "{config}"
        );
        assert_eq!(config["reloads"]["ok"], 0);
        let before = upstream.request_count();
        let (status, _, _) = post_json(&proxy.url(CHAT), &chat_body("alias", false), &[]).await;
        assert_eq!(status, 200, "the running config keeps serving");
        assert_eq!(upstream.requests()[before].json()["model"], "model-1");
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_rotated_pool_key_file_of_a_named_upstream_is_used_by_the_next_request() {
    let upstream = MockUpstream::openai_like().await;
    let pool_key = temp_file("pool-key", "sk-or-pool-rotating-1\n");
    let config = proxy_config(&format!(
        r#"
[upstream]
base_url = "{url}"
api_key_file = "{default_key}"

[upstreams.rotating]
base_url = "{url}"
keys = [{{ name = "only", file = "{pool_key}" }}]

[[routes]]
name = "rotating"
match = {{ model = "rotating" }}
upstream = "rotating"
"#,
        url = upstream.url(),
        default_key = key_file(TEST_KEY),
        pool_key = pool_key.display()
    ));
    let path = temp_file("proxy.toml", &config);
    let (proxy, _) = start_live_proxy(&path).await;
    let ask = || async {
        let before = upstream.request_count();
        let (status, headers, _) =
            post_json(&proxy.url(CHAT), &chat_body("rotating", false), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(text(&headers, "x-proxy-upstream"), "rotating");
        let sent = upstream.wait_requests(before + 1).await;
        sent[before].header("authorization").unwrap().to_owned()
    };
    assert_eq!(ask().await, "Bearer sk-or-pool-rotating-1");

    let temp = pool_key.with_extension("tmp");
    std::fs::write(&temp, "sk-or-pool-rotating-2\n").unwrap();
    std::fs::rename(&temp, &pool_key).unwrap();
    config_when(&proxy, "the key file to be re-read", |c| {
        c["reloads"]["ok"] == 1
    })
    .await;
    assert_eq!(ask().await, "Bearer sk-or-pool-rotating-2");
    let (_, _, body) = read_all(send("GET", &proxy.admin_url("/config"), &[], "").await).await;
    let shown = String::from_utf8_lossy(&body);
    assert!(!shown.contains("sk-or-"), "{shown}");
    assert!(shown.contains("\"only\""), "the key is named: {shown}");
    proxy.stop().await.unwrap();
}

/// The first fenced block of `language` after `heading` in the README.
fn readme_block(heading: &str, language: &str) -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = &readme[readme.find(heading).expect("no such README section")..];
    let fence = format!("```{language}\n");
    let start = section.find(&fence).unwrap() + fence.len();
    let end = start + section[start..].find("```").unwrap();
    section[start..end].to_owned()
}

#[tokio::test]
async fn the_readme_example_loads_and_explains_as_shown() {
    let example = readme_block("## Several upstreams", "toml");
    openrouter_proxy::Config::parse(&example).unwrap();
    let shown = readme_block("### Checking rules offline: explain", "console");
    let expected: String = shown
        .lines()
        .skip(1)
        .take_while(|line| !line.starts_with('$'))
        .map(|line| format!("{line}\n"))
        .collect();
    let (code, out, err) = explain(&example, &["--model", "smart"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, expected);
}

/// `text` with the commented lines from the one starting with `first` through the one starting
/// with `last` uncommented.
fn uncomment(text: &str, first: &str, last: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in text.lines() {
        inside |= line.starts_with(first);
        match line.strip_prefix("# ").or(line.strip_prefix('#')) {
            Some(code) if inside => out.push_str(code),
            _ => out.push_str(line),
        }
        out.push('\n');
        inside &= !line.starts_with(last);
    }
    out
}

#[tokio::test]
async fn the_commented_upstreams_of_proxy_toml_load_once_uncommented() {
    let example = std::fs::read_to_string(root().join("proxy.toml")).unwrap();
    let pool = uncomment(&example, "# keys = [", "# ]")
        .replace("api_key_env = \"OPENROUTER_API_KEY\"", "# api_key_env");
    let upstreams = uncomment(&pool, "# [upstreams.anthropic]", "# auth = \"none\"");
    let text = upstreams.replace(
        "fallbacks = [\"openai/gpt-4o\"]",
        "fallbacks = [\"openai/gpt-4o\", { upstream = \"local\", model = \"llama-3.1-8b-instruct\" }]",
    );
    let config = openrouter_proxy::Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let names: Vec<&str> = config.all_upstreams().map(|(name, _)| name).collect();
    assert_eq!(names, ["default", "anthropic", "local"]);
    assert_eq!(config.upstream.keys.len(), 2);
    let (code, out, err) = explain(&text, &["--model", "smart"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  3. local / llama-3.1-8b-instruct  [http://vllm-0.vllm:8000/v1"),
        "{out}"
    );
}
