//! Observability end to end: exact `/metrics` values for scripted traffic, Prometheus histograms,
//! the bound on model label values, and the JSON access-log line of every kind of request.
//!
//! Metrics and the log subscriber are process-wide, and the tests here run in parallel: every test
//! uses route and model names of its own, and only `model_labels_are_capped` sends model names
//! that no config mentions (they are what the label budget counts).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(
    clippy::too_many_lines,
    reason = "each scenario reads top to bottom: load, fault, then every check of its outcome"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// log capture

/// Installs the process-wide JSON log capture (debug lines too: nothing secret may hide one level
/// below the default); see `common::captured_logs`.
fn captured() {
    captured_logs();
}

fn all_logs() -> String {
    captured_logs()
}

/// The access-log line of the request with `id`, once it is written (when the answer ends).
async fn access_line(id: &str) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let found = all_logs()
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|line| line["target"] == "access" && line["request_id"] == id);
            if let Some(line) = found {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no access-log line for {id}:\n{}", all_logs()))
}

// ---------------------------------------------------------------------------------------------
// metrics scraping

async fn scrape(proxy: &TestProxy) -> String {
    let (status, headers, body) =
        read_all(send("GET", &proxy.admin_url("/metrics"), &[], "").await).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    String::from_utf8(body.to_vec()).unwrap()
}

/// One sample line: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                let mut rest = rest.strip_suffix('}').unwrap();
                while !rest.is_empty() {
                    let (key, tail) = rest.split_once("=\"").unwrap();
                    let end = tail.find('"').unwrap();
                    labels.insert(key.to_owned(), tail[..end].to_owned());
                    rest = tail[end + 1..].trim_start_matches(',');
                }
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the series `name` with exactly `labels`, if it exists.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| n == name && *l == wanted)
        .map(|(_, _, v)| v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} appears twice");
    found.first().copied()
}

/// Every series of `name` whose labels include `having`.
fn series(text: &str, name: &str, having: &[(&str, &str)]) -> Vec<(BTreeMap<String, String>, f64)> {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && having
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, l, v)| (l, v))
        .collect()
}

#[track_caller]
fn assert_value(text: &str, name: &str, labels: &[(&str, &str)], expected: f64) {
    let found = sample(text, name, labels);
    assert!(
        found.is_some_and(|v| (v - expected).abs() < 1e-9),
        "{name} {labels:?}: expected {expected}, found {found:?}\n{}",
        relevant(text, name)
    );
}

fn relevant(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// traffic helpers

fn chat(model: &str, marker: &str) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("say hello {marker}")}],
        "temperature": 0,
    })
    .to_string()
}

fn chat_stream(model: &str, marker: &str) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("stream please {marker}")}],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// POSTs a chat completion with `x-request-id: id` and waits for its access-log line, by which
/// time its metrics are recorded too.
async fn ask(proxy: &TestProxy, id: &str, body: &str) -> (u16, http::HeaderMap, Value) {
    let (status, headers, _) = post_json(
        &proxy.url("/v1/chat/completions"),
        body,
        &[("x-request-id", id)],
    )
    .await;
    assert_eq!(headers["x-request-id"], id);
    (status.as_u16(), headers, access_line(id).await)
}

fn model_of(request: &Recorded) -> String {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
    body["model"].as_str().unwrap_or("").to_owned()
}

const UNAVAILABLE: &str = r#"{"error":{"message":"provider unavailable","code":503}}"#;

/// An OpenRouter-like upstream where models named `*/down` answer 503, `*/hang` never answer and
/// `*/closer` close the connection.
async fn scripted_upstream() -> MockUpstream {
    MockUpstream::start(|request| {
        let model = model_of(request);
        if model.ends_with("/down") {
            Reply::Json(503, UNAVAILABLE.to_owned())
        } else if model.ends_with("/hang") {
            Reply::Hang
        } else if model.ends_with("/closer") {
            Reply::Close
        } else {
            openai_like_reply(request)
        }
    })
    .await
}

fn assert_no_secrets(marker: &str) {
    let logs = all_logs();
    assert!(!logs.contains(TEST_KEY), "the API key reached the logs");
    assert!(!logs.contains(marker), "message content reached the logs");
}

// ---------------------------------------------------------------------------------------------
// metrics

const TRAFFIC: &str = r#"
[[routes]]
name = "obs-traffic-ok"
match = { model = "obs-ok" }
model = "obs/plain"

[[routes]]
name = "obs-traffic-fallback"
match = { model = "obs-fallback" }
model = "obs/down"
fallbacks = ["obs/rescuer"]

[[routes]]
name = "obs-traffic-cached"
match = { model = "obs-cached" }
model = "obs/cached"
cache_ttl = "10m"

[[routes]]
name = "obs-traffic-stream"
match = { model = "obs-stream" }
model = "obs/streamer"

[[routes]]
name = "obs-traffic-failing"
match = { model = "obs-failing" }
model = "obs/down"
fallbacks = ["obs/also/down"]
"#;

#[tokio::test]
async fn scripted_traffic_is_counted_exactly() {
    captured();
    let upstream = scripted_upstream().await;
    let proxy = TestProxy::start(&upstream, TRAFFIC).await;
    let marker = "marker-traffic-5b0c1e";

    let (status, _, _) = ask(&proxy, "obs-traffic-1", &chat("obs-ok", marker)).await;
    assert_eq!(status, 200);
    let (status, headers, _) = ask(&proxy, "obs-traffic-2", &chat("obs-fallback", marker)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "obs/rescuer");
    let (_, headers, _) = ask(&proxy, "obs-traffic-3", &chat("obs-cached", marker)).await;
    assert_eq!(headers["x-cache"], "MISS");
    let (_, headers, _) = ask(&proxy, "obs-traffic-4", &chat("obs-cached", marker)).await;
    assert_eq!(headers["x-cache"], "HIT");
    let (status, _, _) = ask(&proxy, "obs-traffic-5", &chat_stream("obs-stream", marker)).await;
    assert_eq!(status, 200);
    let (status, _, _) = ask(&proxy, "obs-traffic-6", &chat("obs-failing", marker)).await;
    assert_eq!(status, 503);

    let m = scrape(&proxy).await;
    let requests = "openrouter_requests_total";
    assert_value(
        &m,
        requests,
        &[
            ("route", "obs-traffic-ok"),
            ("model", "obs/plain"),
            ("status", "200"),
        ],
        1.0,
    );
    assert_value(
        &m,
        requests,
        &[
            ("route", "obs-traffic-fallback"),
            ("model", "obs/rescuer"),
            ("status", "200"),
        ],
        1.0,
    );
    assert_value(
        &m,
        requests,
        &[
            ("route", "obs-traffic-cached"),
            ("model", "obs/cached"),
            ("status", "200"),
        ],
        2.0,
    );
    assert_value(
        &m,
        requests,
        &[
            ("route", "obs-traffic-stream"),
            ("model", "obs/streamer"),
            ("status", "200"),
        ],
        1.0,
    );
    // Nothing served it: the requested model names the failure.
    assert_value(
        &m,
        requests,
        &[
            ("route", "obs-traffic-failing"),
            ("model", "obs-failing"),
            ("status", "503"),
        ],
        1.0,
    );
    for route in [
        "obs-traffic-ok",
        "obs-traffic-fallback",
        "obs-traffic-cached",
        "obs-traffic-stream",
        "obs-traffic-failing",
    ] {
        let all: f64 = series(&m, requests, &[("route", route)])
            .iter()
            .map(|(_, v)| v)
            .sum();
        let expected = if route == "obs-traffic-cached" {
            2.0
        } else {
            1.0
        };
        assert_eq!(all, expected, "{route}\n{}", relevant(&m, requests));
    }

    // Fallbacks and attempts.
    let fallbacks = "openrouter_fallbacks_total";
    assert_value(
        &m,
        fallbacks,
        &[
            ("from", "obs/down"),
            ("to", "obs/rescuer"),
            ("reason", "status_5xx"),
        ],
        1.0,
    );
    assert_value(
        &m,
        fallbacks,
        &[
            ("from", "obs/down"),
            ("to", "obs/also/down"),
            ("reason", "status_5xx"),
        ],
        1.0,
    );
    let attempts = "openrouter_upstream_attempts_total";
    assert_value(
        &m,
        attempts,
        &[
            ("upstream", "default"),
            ("model", "obs/plain"),
            ("outcome", "answered"),
        ],
        1.0,
    );
    assert_value(
        &m,
        attempts,
        &[
            ("upstream", "default"),
            ("model", "obs/down"),
            ("outcome", "status_5xx"),
        ],
        2.0,
    );
    assert_value(
        &m,
        attempts,
        &[
            ("upstream", "default"),
            ("model", "obs/rescuer"),
            ("outcome", "answered"),
        ],
        1.0,
    );
    assert_value(
        &m,
        attempts,
        &[
            ("upstream", "default"),
            ("model", "obs/also/down"),
            ("outcome", "status_5xx"),
        ],
        1.0,
    );
    assert_value(
        &m,
        attempts,
        &[
            ("upstream", "default"),
            ("model", "obs/cached"),
            ("outcome", "answered"),
        ],
        1.0,
    );
    assert_value(
        &m,
        attempts,
        &[
            ("upstream", "default"),
            ("model", "obs/streamer"),
            ("outcome", "answered"),
        ],
        1.0,
    );

    // The cache: one miss, one hit; the hit consumed no tokens and cost nothing.
    let cache = "openrouter_cache_requests_total";
    assert_value(
        &m,
        cache,
        &[
            ("route", "obs-traffic-cached"),
            ("result", "miss"),
            ("tier", "none"),
        ],
        1.0,
    );
    assert_value(
        &m,
        cache,
        &[
            ("route", "obs-traffic-cached"),
            ("result", "hit"),
            ("tier", "memory"),
        ],
        1.0,
    );
    assert!(sample(
        &m,
        cache,
        &[
            ("route", "obs-traffic-cached"),
            ("result", "bypass"),
            ("tier", "none")
        ]
    )
    .is_none());
    assert!(
        series(&m, cache, &[("route", "obs-traffic-ok")]).is_empty(),
        "no cache on that route"
    );

    // Tokens and cost from the JSON answers' and the stream's usage.
    let tokens = "openrouter_tokens_total";
    let cost = "openrouter_cost_usd_total";
    for model in ["obs/plain", "obs/rescuer", "obs/cached"] {
        assert_value(&m, tokens, &[("model", model), ("type", "prompt")], 7.0);
        assert_value(&m, tokens, &[("model", model), ("type", "completion")], 3.0);
        assert_value(&m, cost, &[("model", model)], 0.0001);
    }
    assert_value(
        &m,
        tokens,
        &[("model", "obs/streamer"), ("type", "prompt")],
        7.0,
    );
    assert_value(
        &m,
        tokens,
        &[("model", "obs/streamer"), ("type", "completion")],
        4.0,
    );
    assert_value(&m, cost, &[("model", "obs/streamer")], 0.00042);
    assert!(series(&m, tokens, &[("model", "obs-failing")]).is_empty());
    assert!(series(&m, tokens, &[("model", "obs/down")]).is_empty());

    // Histograms: one observation per request, with Prometheus buckets.
    let latency = "openrouter_request_latency_seconds";
    let labels = [("route", "obs-traffic-cached"), ("model", "obs/cached")];
    assert_value(&m, &format!("{latency}_count"), &labels, 2.0);
    let inf = [labels[0], labels[1], ("le", "+Inf")];
    assert_value(&m, &format!("{latency}_bucket"), &inf, 2.0);
    let ttfb = "openrouter_time_to_first_byte_seconds_count";
    assert_value(
        &m,
        ttfb,
        &[("route", "obs-traffic-stream"), ("model", "obs/streamer")],
        1.0,
    );
    assert_value(
        &m,
        ttfb,
        &[("route", "obs-traffic-failing"), ("model", "obs-failing")],
        1.0,
    );

    // Overhead: one per request that reached the upstream or the cache.
    let overhead = "openrouter_proxy_overhead_seconds";
    for (route, count) in [
        ("obs-traffic-ok", 1.0),
        ("obs-traffic-fallback", 1.0),
        ("obs-traffic-cached", 2.0),
        ("obs-traffic-stream", 1.0),
        ("obs-traffic-failing", 1.0),
    ] {
        assert_value(&m, &format!("{overhead}_count"), &[("route", route)], count);
        assert_value(
            &m,
            &format!("{overhead}_bucket"),
            &[("route", route), ("le", "+Inf")],
            count,
        );
    }
    let buckets: Vec<String> = series(
        &m,
        &format!("{overhead}_bucket"),
        &[("route", "obs-traffic-ok")],
    )
    .into_iter()
    .map(|(labels, _)| labels["le"].clone())
    .collect();
    assert_eq!(
        buckets.first().map(String::as_str),
        Some("0.00001"),
        "{buckets:?}"
    );
    assert!(buckets.contains(&"0.1".to_owned()), "{buckets:?}");
    assert!(
        m.contains("\nopenrouter_active_requests "),
        "the gauge exists from the start"
    );

    for histogram in [latency, "openrouter_time_to_first_byte_seconds", overhead] {
        assert!(
            m.contains(&format!("# TYPE {histogram} histogram\n")),
            "{histogram} is not a histogram"
        );
    }
    assert!(
        !m.contains("quantile="),
        "a histogram rendered as a summary"
    );

    assert!(!m.contains(TEST_KEY));
    assert!(!m.contains(marker));
    assert_no_secrets(marker);
}

#[tokio::test]
async fn model_labels_are_capped() {
    captured();
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(
        &upstream,
        r#"
[metrics]
max_model_labels = 2

[[routes]]
name = "obs-cap-pass"
match = { model = "obs-cap/*" }

[[routes]]
name = "obs-cap-named"
match = { model = "obs-cap-named" }
model = "obs-capped/target"
"#,
    )
    .await;
    // One at a time, so the first two names are the admitted ones.
    for n in 1..=5 {
        let (status, _, _) = ask(
            &proxy,
            &format!("obs-cap-{n}"),
            &chat(&format!("obs-cap/m{n}"), ""),
        )
        .await;
        assert_eq!(status, 200);
    }
    let long = format!("obs-cap/{}", "x".repeat(300));
    ask(&proxy, "obs-cap-long", &chat(&long, "")).await;
    // Named by the config: labelled by name though the budget is spent.
    ask(&proxy, "obs-cap-named", &chat("obs-cap-named", "")).await;

    let m = scrape(&proxy).await;
    let requests = series(
        &m,
        "openrouter_requests_total",
        &[("route", "obs-cap-pass")],
    );
    let models: BTreeSet<&str> = requests.iter().map(|(l, _)| l["model"].as_str()).collect();
    assert_eq!(
        models,
        BTreeSet::from(["obs-cap/m1", "obs-cap/m2", "other"]),
        "{requests:?}"
    );
    let r = "openrouter_requests_total";
    assert_value(
        &m,
        r,
        &[
            ("route", "obs-cap-pass"),
            ("model", "other"),
            ("status", "200"),
        ],
        4.0,
    );
    assert_value(
        &m,
        r,
        &[
            ("route", "obs-cap-pass"),
            ("model", "obs-cap/m1"),
            ("status", "200"),
        ],
        1.0,
    );
    assert_value(
        &m,
        r,
        &[
            ("route", "obs-cap-named"),
            ("model", "obs-capped/target"),
            ("status", "200"),
        ],
        1.0,
    );

    // Every family with a model label honours the same bound.
    for family in [
        "openrouter_upstream_attempts_total",
        "openrouter_tokens_total",
        "openrouter_cost_usd_total",
    ] {
        for (labels, _) in series(&m, family, &[]) {
            let model = labels["model"].as_str();
            assert!(
                !model.starts_with("obs-cap/") || model == "obs-cap/m1" || model == "obs-cap/m2",
                "{family} has {model}"
            );
        }
    }
    assert_value(
        &m,
        "openrouter_upstream_attempts_total",
        &[
            ("upstream", "default"),
            ("model", "other"),
            ("outcome", "answered"),
        ],
        4.0,
    );
    assert_value(
        &m,
        "openrouter_tokens_total",
        &[("model", "other"), ("type", "prompt")],
        28.0,
    );
    for n in 3..=5 {
        assert!(!m.contains(&format!("obs-cap/m{n}")));
    }
    assert!(!m.contains(&long));

    // The log line keeps the full name: logs are not bounded by label cardinality.
    let line = access_line("obs-cap-4").await;
    assert_eq!(line["requested_model"], "obs-cap/m4");
    assert_eq!(line["served_model"], "obs-cap/m4");
}

#[test]
fn metrics_config_is_validated() {
    let config = openrouter_proxy::Config::parse("").unwrap();
    assert_eq!(config.metrics.max_model_labels, 100);
    let config = openrouter_proxy::Config::parse("[metrics]\nmax_model_labels = 0").unwrap();
    assert_eq!(config.metrics.max_model_labels, 0);
    let err = openrouter_proxy::Config::parse("[metrics]\nmax_model_label = 5")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_model_label") && err.contains("line 2"),
        "{err}"
    );
    let err = openrouter_proxy::Config::parse("[metrics]\nmax_model_labels = 20000")
        .unwrap_err()
        .to_string();
    assert!(err.contains("metrics.max_model_labels"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// access log

const LOGGED: &str = r#"
[server]
max_body_bytes = 4096

[[routes]]
name = "obs-log-plain"
match = { model = "obs-log-plain" }
model = "obs-log/plain"

[[routes]]
name = "obs-log-fallback"
match = { model = "obs-log-fallback" }
model = "obs-log/down"
fallbacks = ["obs-log/rescuer"]

[[routes]]
name = "obs-log-cached"
match = { model = "obs-log-cached" }
model = "obs-log/cached"
cache_ttl = "10m"

[[routes]]
name = "obs-log-closer"
match = { model = "obs-log-closer" }
model = "obs-log/closer"

[[routes]]
name = "obs-log-hang"
match = { model = "obs-log-hang" }
model = "obs-log/hang"
first_byte_timeout = "300ms"

[[routes]]
name = "obs-log-stream"
match = { model = "obs-log-stream" }
model = "obs-log/streamer"
"#;

#[tokio::test]
async fn request_ids_round_trip_and_the_access_line_has_its_fields() {
    captured();
    let upstream = scripted_upstream().await;
    let proxy = TestProxy::start(&upstream, LOGGED).await;
    let marker = "marker-fields-9d41aa";

    let (status, _, line) = ask(&proxy, "obs-log-given-id", &chat("obs-log-plain", marker)).await;
    assert_eq!(status, 200);
    // The upstream sees the client's id too.
    let sent = upstream.requests();
    assert_eq!(
        sent.last().unwrap().header("x-request-id"),
        Some("obs-log-given-id")
    );
    assert_eq!(line["message"], "request");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["target"], "access");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/v1/chat/completions");
    assert_eq!(line["route"], "obs-log-plain");
    assert_eq!(line["requested_model"], "obs-log-plain");
    assert_eq!(line["served_model"], "obs-log/plain");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["status"], 200);
    assert_eq!(line["outcome"], "complete");
    assert_eq!(line["error"], "");
    assert_eq!(line["cache"], "");
    assert_eq!(line["prompt_tokens"], 7);
    assert_eq!(line["completion_tokens"], 3);
    assert_eq!(line["cost_usd"], 0.0001);
    for timing in ["ttfb_ms", "duration_ms", "overhead_ms"] {
        assert!(
            line[timing].as_f64().is_some_and(|ms| ms >= 0.0),
            "{timing}: {line}"
        );
    }
    assert!(
        line["overhead_ms"].as_f64() <= line["ttfb_ms"].as_f64(),
        "{line}"
    );
    assert!(
        line["ttfb_ms"].as_f64() <= line["duration_ms"].as_f64(),
        "{line}"
    );
    assert!(line["bytes"].as_u64().is_some_and(|b| b > 0), "{line}");
    assert!(line.get("timestamp").is_some(), "{line}");

    // Without an id, one is made up, returned, sent upstream and logged.
    let (status, headers, _) = post_json(
        &proxy.url("/v1/chat/completions"),
        &chat("obs-log-plain", marker),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let id = headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(
        upstream.requests().last().unwrap().header("x-request-id"),
        Some(id.as_str())
    );
    let line = access_line(&id).await;
    assert_eq!(line["route"], "obs-log-plain");
    assert_eq!(line["status"], 200);
    // Ids are unique.
    let (_, again, _) = post_json(
        &proxy.url("/v1/chat/completions"),
        &chat("obs-log-plain", marker),
        &[],
    )
    .await;
    assert_ne!(again["x-request-id"], id.as_str());

    // A streamed answer logs the usage of its last chunk.
    let (status, _, line) = ask(
        &proxy,
        "obs-log-stream-id",
        &chat_stream("obs-log-stream", marker),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(line["prompt_tokens"], 7);
    assert_eq!(line["completion_tokens"], 4);
    assert_eq!(line["cost_usd"], 0.00042);
    assert_eq!(line["outcome"], "complete");

    let (_, _, metrics) = read_all(send("GET", &proxy.admin_url("/metrics"), &[], "").await).await;
    assert!(!std::str::from_utf8(&metrics).unwrap().contains(TEST_KEY));
    assert_no_secrets(marker);
}

#[tokio::test]
async fn every_kind_of_answer_writes_one_access_line() {
    captured();
    let upstream = scripted_upstream().await;
    let proxy = TestProxy::start(&upstream, LOGGED).await;
    let marker = "marker-kinds-77e2f0";

    // 400: not JSON.
    let (status, _, _) = post_json(
        &proxy.url("/v1/chat/completions"),
        &format!("{{\"model\": \"obs-log-plain\", {marker}"),
        &[("x-request-id", "obs-kind-400")],
    )
    .await;
    assert_eq!(status, 400);
    let line = access_line("obs-kind-400").await;
    assert_eq!(
        (line["status"].as_u64(), line["error"].as_str()),
        (Some(400), Some("invalid_json"))
    );
    assert_eq!(line["attempts"], 0);
    assert!(
        line["overhead_ms"].is_null(),
        "nothing was dispatched: {line}"
    );

    // 413: over server.max_body_bytes.
    let big = chat("obs-log-plain", &format!("{marker}{}", "x".repeat(8192)));
    let (status, _, _) = post_json(
        &proxy.url("/v1/chat/completions"),
        &big,
        &[("x-request-id", "obs-kind-413")],
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(access_line("obs-kind-413").await["status"], 413);

    // 404: outside /v1.
    let (status, _, _) = read_all(
        send(
            "GET",
            &proxy.url("/v2/models"),
            &[("x-request-id", "obs-kind-404")],
            "",
        )
        .await,
    )
    .await;
    assert_eq!(status, 404);
    let line = access_line("obs-kind-404").await;
    assert_eq!(
        (line["status"].as_u64(), line["path"].as_str()),
        (Some(404), Some("/v2/models"))
    );

    // 502: the upstream closes the connection.
    let (status, _, line) = ask(&proxy, "obs-kind-502", &chat("obs-log-closer", marker)).await;
    assert_eq!(status, 502);
    assert_eq!(line["status"], 502);
    assert_eq!(line["attempts"], 1);
    assert_ne!(line["error"], "");

    // 504: no answer within the route's first-byte timeout.
    let (status, _, line) = ask(&proxy, "obs-kind-504", &chat("obs-log-hang", marker)).await;
    assert_eq!(status, 504);
    assert_eq!(
        (line["status"].as_u64(), line["route"].as_str()),
        (Some(504), Some("obs-log-hang"))
    );

    // A fallback: two attempts, the second model served.
    let (status, _, line) = ask(
        &proxy,
        "obs-kind-fallback",
        &chat("obs-log-fallback", marker),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["served_model"], "obs-log/rescuer");
    assert_eq!(line["status"], 200);

    // A cache miss, then a hit: no attempts, and the hit's log line carries no usage of its own.
    let (_, _, line) = ask(&proxy, "obs-kind-miss", &chat("obs-log-cached", marker)).await;
    assert_eq!(
        (line["cache"].as_str(), line["prompt_tokens"].as_u64()),
        (Some("MISS"), Some(7))
    );
    let (status, headers, line) =
        ask(&proxy, "obs-kind-hit", &chat("obs-log-cached", marker)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(line["cache"], "HIT");
    assert_eq!(line["attempts"], 0);
    assert_eq!(line["status"], 200);
    assert_eq!(line["served_model"], "obs-log/cached");
    assert!(line["prompt_tokens"].is_null(), "{line}");
    assert!(line["overhead_ms"].as_f64().is_some(), "{line}");

    // 499: the client leaves mid-stream; the upstream request is cancelled.
    let (reply, tx, closed) = stream_reply();
    upstream.push(reply);
    let response = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "obs-kind-499"),
        ],
        chat_stream("obs-log-stream", marker),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    tx.send(data(&chunk_event("obs-log/streamer", "Hel")))
        .await
        .unwrap();
    read_until(&mut body, "Hel").await;
    drop(body);
    // Writing more makes the closed connection show at once.
    let _ = tx.send(data(&chunk_event("obs-log/streamer", "lo"))).await;
    tokio::time::timeout(PATIENCE, closed)
        .await
        .unwrap()
        .unwrap();
    let line = access_line("obs-kind-499").await;
    assert_eq!(line["status"], 499);
    assert_eq!(line["response_status"], 200);
    assert_eq!(line["outcome"], "client_closed");
    assert_eq!(line["served_model"], "obs-log/streamer");

    // One line per request, no more.
    let logs = all_logs();
    for id in [
        "obs-kind-400",
        "obs-kind-413",
        "obs-kind-404",
        "obs-kind-502",
        "obs-kind-504",
        "obs-kind-fallback",
        "obs-kind-hit",
        "obs-kind-499",
    ] {
        let lines = logs
            .lines()
            .filter(|l| {
                l.contains("\"target\":\"access\"")
                    && l.contains(&format!("\"request_id\":\"{id}\""))
            })
            .count();
        assert_eq!(lines, 1, "{id}");
    }
    assert_no_secrets(marker);
}
