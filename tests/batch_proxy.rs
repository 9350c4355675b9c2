//! The Batch API inside the real proxy: the official OpenAI SDKs (Python, and a Node smoke test)
//! upload and create batches on the proxy's own socket, the lines run through the proxy's
//! pipeline (routes, model rewrite, retries) to a scripted mock upstream, ownership follows the
//! inbound token, and a proxy killed with SIGKILL mid-batch resumes on the same store without
//! sending again a line whose answer had arrived. Without `[batch]` the paths are forwarded.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use support::batch::{custom_ids, input_file, jsonl, numbered, numbered_lines, store_dir, Gates};
use support::*;

const ALICE: &str = "alice-secret-token";
const BOB: &str = "bob-secret-token";
/// The model the lines ask for, and what the route rewrites it to.
const ROUTE: &str =
    "[[routes]]\nname = \"batchy\"\nmatch = { model = \"m\" }\nmodel = \"vendor/rewritten\"\n";

fn token(name: &str, secret: &str) -> String {
    let digest = openrouter_proxy::auth::hex(&openrouter_proxy::auth::sha256(secret.as_bytes()));
    format!("[[server.tokens]]\nname = \"{name}\"\nsha256 = \"{digest}\"\n")
}

/// A config file for the binary: tokens for alice and bob, the upstream at `upstream`, the Batch
/// API on `store` (with `batch` appended to its table), and the rewriting route.
fn binary_config(upstream: &MockUpstream, store: &Path, batch: &str) -> PathBuf {
    let key = temp_file("key", TEST_KEY);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\
         {}{}\
         [upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\
         [batch]\nstore = \"{}\"\nretry_base = \"20ms\"\n{batch}\n{ROUTE}",
        token("alice", ALICE),
        token("bob", BOB),
        upstream.url(),
        key.display(),
        store.display(),
    );
    temp_file("proxy.toml", &text)
}

/// The number N of a `numbered_lines` request (its message is "question N").
fn line_of(request: &Recorded) -> usize {
    let body = request.json();
    let content = body["messages"][0]["content"].as_str().unwrap();
    content.strip_prefix("question ").unwrap().parse().unwrap()
}

/// The mock's answer to line N, naming the model it was sent.
fn answer(request: &Recorded) -> Reply {
    let model = request.json()["model"].as_str().unwrap().to_owned();
    let text = format!("answer to line-{}", line_of(request));
    Reply::Json(200, chat_completion(&model, &text))
}

/// How many requests the mock received for each line.
fn sent_per_line(upstream: &MockUpstream) -> HashMap<usize, usize> {
    let mut sent = HashMap::new();
    for request in upstream.requests() {
        *sent.entry(line_of(&request)).or_default() += 1;
    }
    sent
}

/// Runs `tests/sdk/batch_python.py` with `args` against the proxy at `addr` as the caller with
/// `key`, and returns the JSON it printed.
async fn python_sdk(addr: &str, key: &str, args: &[&str]) -> Value {
    let output = tokio::process::Command::new(python())
        .arg(root().join("tests/sdk/batch_python.py"))
        .args(args)
        .env("OPENAI_BASE_URL", format!("http://{addr}/v1"))
        .env("OPENAI_API_KEY", key)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE * 6, output)
        .await
        .expect("the SDK client did not finish in time")
        .expect("could not start the SDK client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "SDK client failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn counts(batch: &Value) -> (u64, u64, u64) {
    let c = &batch["request_counts"];
    let n = |key: &str| c[key].as_u64().unwrap();
    (n("total"), n("completed"), n("failed"))
}

/// A mock that rate limits line 7 twice, answers line 9 with a 400, and answers the rest.
async fn upstream_with_bad_lines() -> MockUpstream {
    let seen = Mutex::new(HashMap::<usize, u32>::new());
    MockUpstream::start(move |request| {
        let n = line_of(request);
        let times = {
            let mut asked = seen.lock().unwrap();
            let times = asked.entry(n).or_default();
            *times += 1;
            *times
        };
        match n {
            7 if times <= 2 => Reply::Json(429, error_body("slow down", "rate_limit_exceeded")),
            9 => Reply::Json(400, error_body("bad line", "invalid_request_error")),
            _ => answer(request),
        }
    })
    .await
}

#[tokio::test]
async fn two_hundred_lines_run_through_the_proxy_as_their_owner() {
    let upstream = upstream_with_bad_lines().await;
    let config = binary_config(&upstream, &store_dir(), "");
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let input = input_file(&numbered_lines("line", 200));

    let summary = python_sdk(&proxy.api, ALICE, &["run", input.to_str().unwrap()]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(counts(batch), (200, 199, 1));
    let output = jsonl(&summary["output"]);
    let mut expected = numbered("line", 1..=200);
    expected.retain(|id| id != "line-9");
    assert_eq!(custom_ids(&output), expected);
    for line in &output {
        let id = line["custom_id"].as_str().unwrap();
        let body = &line["response"]["body"];
        assert_eq!(line["response"]["status_code"], 200, "{line}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("answer to {id}")
        );
        assert_eq!(
            body["model"], "vendor/rewritten",
            "the route's model served the line"
        );
        assert!(!line["response"]["request_id"].as_str().unwrap().is_empty());
    }
    let errors = jsonl(&summary["error"]);
    assert_eq!(custom_ids(&errors), ["line-9"]);
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["message"],
        "bad line"
    );

    for request in upstream.requests() {
        assert_eq!(request.path_and_query, "/api/v1/chat/completions");
        let body = request.json();
        assert_eq!(
            body["model"], "vendor/rewritten",
            "the route rewrote the model"
        );
        assert!(body.get("stream").is_none(), "lines are never streamed");
        let auth = request.header("authorization");
        assert_eq!(auth, Some(format!("Bearer {TEST_KEY}").as_str()));
    }
    let sent = sent_per_line(&upstream);
    assert_eq!(sent.len(), 200);
    assert_eq!(sent[&7], 3, "two 429s, then the answer");
    assert!(
        sent.iter().all(|(n, times)| *n == 7 || *times == 1),
        "{sent:?}"
    );

    // Another token sees none of alice's objects.
    let batch_id = batch["id"].as_str().unwrap();
    let file_id = batch["input_file_id"].as_str().unwrap();
    python_sdk(&proxy.api, BOB, &["foreign", batch_id, file_id]).await;
    // No token: the same 401 as any other path.
    let (batches_url, models_url) = (
        format!("http://{}/v1/batches", proxy.api),
        format!("http://{}/v1/models", proxy.api),
    );
    let batches = read_all(send("GET", &batches_url, &[], "").await).await;
    let models = read_all(send("GET", &models_url, &[], "").await).await;
    assert_eq!(batches.0, 401);
    assert_eq!(error_json(&batches.2), error_json(&models.2));

    proxy.signal("TERM").await;
    let (status, logs) = proxy.wait().await;
    assert!(status.success(), "{status:?}");
    let access: Vec<Value> = logs
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == "request" && event["batch_id"] != "")
        .collect();
    assert!(access.len() >= 200, "{} batch access lines", access.len());
    for event in &access {
        assert_eq!(event["batch_id"], batch_id, "{event}");
        assert_eq!(event["caller"], "alice", "{event}");
        assert_eq!(event["route"], "batchy", "{event}");
    }
}

fn error_body(message: &str, kind: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": kind, "code": null}}).to_string()
}

#[tokio::test]
async fn a_proxy_killed_mid_batch_resumes_without_sending_an_answered_line_again() {
    // Lines 1 to 10 are answered at once; the others are held while `hold` is set.
    let gates = Gates::default();
    let hold = Arc::new(AtomicBool::new(true));
    let (held, holding) = (gates.clone(), hold.clone());
    let upstream = MockUpstream::start(move |request| {
        if line_of(request) > 10 && holding.load(Ordering::SeqCst) {
            held.hold(answer(request))
        } else {
            answer(request)
        }
    })
    .await;
    let store = store_dir();
    let config = binary_config(&upstream, &store, "concurrency = 4\n");
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let input = input_file(&numbered_lines("line", 20));
    let created = python_sdk(&proxy.api, ALICE, &["create", input.to_str().unwrap()]).await;
    let batch_id = created["batch_id"].as_str().unwrap().to_owned();

    // Four lines in flight at most, four of them held: the ten others were answered, and each
    // was recorded before its slot went to a held line.
    upstream.wait_requests(14).await;
    proxy.signal("KILL").await;
    let (status, _) = proxy.wait().await;
    assert!(!status.success(), "{status:?}");
    let before = sent_per_line(&upstream);
    assert_eq!(before.values().sum::<usize>(), 14, "{before:?}");
    assert!((1..=10).all(|n| before.get(&n) == Some(&1)), "{before:?}");
    hold.store(false, Ordering::SeqCst);
    gates.release();

    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let summary = python_sdk(&proxy.api, ALICE, &["wait", &batch_id]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(counts(batch), (20, 20, 0));
    let output = jsonl(&summary["output"]);
    assert_eq!(
        custom_ids(&output),
        numbered("line", 1..=20),
        "every line exactly once"
    );
    for line in &output {
        let id = line["custom_id"].as_str().unwrap();
        let body = &line["response"]["body"];
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("answer to {id}")
        );
    }
    let after = sent_per_line(&upstream);
    for n in 1..=20 {
        // Answered before the kill: never sent again. In flight at the kill: sent once more.
        let expected = before.get(&n).map_or(1, |_| if n <= 10 { 1 } else { 2 });
        assert_eq!(after.get(&n), Some(&expected), "line {n}: {after:?}");
    }
    proxy.signal("TERM").await;
    assert!(proxy.wait().await.0.success());
}

#[tokio::test]
async fn without_batch_the_paths_are_forwarded_upstream() {
    let upstream =
        MockUpstream::start(|_| Reply::Json(200, r#"{"object":"list","data":[]}"#.into())).await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (status, _, body) = read_all(send("GET", &proxy.url("/v1/files"), &[], "").await).await;
    assert_eq!(
        (status.as_u16(), &body[..]),
        (200, &br#"{"object":"list","data":[]}"#[..])
    );
    let url = proxy.url("/v1/batches");
    let created = send(
        "POST",
        &url,
        &[("content-type", "application/json")],
        r#"{"input_file_id":"file-x","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
    );
    assert_eq!(read_all(created.await).await.0, 200);
    let sent = upstream.requests();
    let paths: Vec<&str> = sent.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(paths, ["/api/v1/files", "/api/v1/batches"]);
    assert_eq!(sent[1].json()["input_file_id"], "file-x");
    proxy.stop().await.unwrap();

    // The same proxy with [batch] answers them itself.
    let store = store_dir();
    let batch = format!("[batch]\nstore = \"{}\"\n", store.display());
    let proxy = TestProxy::start(&upstream, &batch).await;
    let (status, _, body) = read_all(send("GET", &proxy.url("/v1/files"), &[], "").await).await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            listed["object"].as_str(),
            listed["data"].as_array().map(Vec::len)
        ),
        (Some("list"), Some(0))
    );
    assert_eq!(upstream.request_count(), 2, "nothing more went upstream");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn node_sdk_runs_a_batch_through_the_proxy() {
    let upstream = MockUpstream::start(answer).await;
    let store = store_dir();
    let batch = format!(
        "[batch]\nstore = \"{}\"\nconcurrency = 2\n",
        store.display()
    );
    let proxy = TestProxy::start(&upstream, &batch).await;
    let node_modules = std::env::var_os("OPENAI_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/sdk-node/node_modules"));
    let mut command = tokio::process::Command::new("node");
    command
        .arg(root().join("tests/sdk/batch_node.cjs"))
        .env("OPENAI_NODE_MODULES", node_modules)
        .env("BATCH_INPUT", input_file(&numbered_lines("line", 3)));
    run_client(command, &proxy).await;
    assert_eq!(sent_per_line(&upstream).len(), 3);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn batch_lines_wait_while_live_requests_are_above_yield_above() {
    let gates = Gates::default();
    let held = gates.clone();
    let upstream = MockUpstream::start(move |request| {
        let body = request.json();
        if body["messages"][0]["content"] == "live" {
            held.hold(Reply::Json(200, chat_completion("m", "live answer")))
        } else {
            answer(request)
        }
    })
    .await;
    let store = store_dir();
    let batch = format!(
        "[batch]\nstore = \"{}\"\nyield_above = 0\n",
        store.display()
    );
    let proxy = TestProxy::start(&upstream, &batch).await;
    let live = r#"{"model":"m","messages":[{"role":"user","content":"live"}]}"#;
    let chat = proxy.url("/v1/chat/completions");
    let json = [("content-type", "application/json")];
    // Held at the mock until released: `send` would time out waiting for it, so it runs aside.
    let live = tokio::spawn(async move {
        let client = client();
        let request = http::Request::post(chat)
            .header(json[0].0, json[0].1)
            .body(http_body_util::Full::new(bytes::Bytes::from(live)))
            .unwrap();
        read_all(client.request(request).await.unwrap()).await
    });
    upstream.wait_requests(1).await;

    let addr = proxy.addr.to_string();
    let input = input_file(&numbered_lines("line", 3));
    let created = python_sdk(&addr, "k", &["create", input.to_str().unwrap()]).await;
    let batch_id = created["batch_id"].as_str().unwrap().to_owned();
    let url = proxy.url(&format!("/v1/batches/{batch_id}"));
    let auth = [("authorization", "Bearer k")];
    wait_until_async("the batch is validated", || async {
        let (_, _, body) = read_all(send("GET", &url, &auth, "").await).await;
        serde_json::from_slice::<Value>(&body).unwrap()["status"] != "validating"
    })
    .await;
    // A live request in flight is above `yield_above = 0`: no line has gone upstream.
    assert_eq!(upstream.request_count(), 1, "{:?}", sent_paths(&upstream));

    gates.release();
    assert_eq!(live.await.unwrap().0, 200);
    let summary = python_sdk(&addr, "k", &["wait", &batch_id]).await;
    assert_eq!(summary["batch"]["status"], "completed", "{summary}");
    assert_eq!(upstream.request_count(), 4);
    proxy.stop().await.unwrap();
}

fn sent_paths(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

/// Polls `condition` until it holds; fails the test after [`PATIENCE`].
async fn wait_until_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: never");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn pass_through_callers_own_their_batches_and_their_lines_carry_their_key() {
    let upstream = MockUpstream::start(answer).await;
    let store = store_dir();
    let extra = format!(
        "[upstream]\nauth = \"passthrough\"\n[batch]\nstore = \"{}\"\n",
        store.display()
    );
    let proxy = TestProxy::start(&upstream, &extra).await;
    let addr = proxy.addr.to_string();

    // No key: the same 401 as a chat request without one.
    let (status, _, body) = read_all(send("GET", &proxy.url("/v1/files"), &[], "").await).await;
    let chat = r#"{"model":"m","messages":[]}"#;
    let (_, _, chat_body) = read_all(chat_request(&proxy, chat).await).await;
    assert_eq!(status, 401);
    assert_eq!(error_json(&body), error_json(&chat_body));
    assert_eq!(error_json(&body)["error"]["code"], "missing_credentials");

    let input = input_file(&numbered_lines("line", 3));
    let summary = python_sdk(&addr, "sk-or-key-a", &["run", input.to_str().unwrap()]).await;
    assert_eq!(summary["batch"]["status"], "completed", "{summary}");
    for request in upstream.requests() {
        assert_eq!(request.header("authorization"), Some("Bearer sk-or-key-a"));
    }
    let batch = &summary["batch"];
    let (batch_id, file_id) = (
        batch["id"].as_str().unwrap(),
        batch["input_file_id"].as_str().unwrap(),
    );
    python_sdk(&addr, "sk-or-key-b", &["foreign", batch_id, file_id]).await;
    proxy.stop().await.unwrap();
}
