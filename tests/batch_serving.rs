//! The Batch API served by the proxy in-process: without `[batch]` the paths are forwarded, a
//! Node SDK smoke test, lines yield to live requests, pass-through callers and their keys, a
//! graceful stop mid-batch, and `[batch]` as a restart-only setting.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::batch::{custom_ids, input_file, jsonl, numbered, numbered_lines, store_dir, Gates};
use common::batch_proxy::*;
use common::*;
use serde_json::Value;

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
    let batch_id = sdk_create_batch(&addr, "k", 3).await;
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

#[tokio::test]
async fn a_graceful_stop_mid_batch_releases_the_store_and_the_batch_resumes() {
    // Lines 1 and 2 are answered at once; the others are held while `hold` is set.
    let gates = Gates::default();
    let hold = Arc::new(AtomicBool::new(true));
    let (held, holding) = (gates.clone(), hold.clone());
    let upstream = MockUpstream::start(move |request| {
        if line_of(request) > 2 && holding.load(Ordering::SeqCst) {
            held.hold(answer(request))
        } else {
            answer(request)
        }
    })
    .await;
    let store = store_dir();
    let extra = format!(
        "[server]\nshutdown_grace = \"100ms\"\n[batch]\nstore = \"{}\"\nconcurrency = 2\n",
        store.display()
    );
    let proxy = TestProxy::start(&upstream, &extra).await;
    let batch_id = sdk_create_batch(&proxy.addr.to_string(), "k", 5).await;
    upstream.wait_requests(4).await;

    // Two held lines in flight: the stop gives them the grace period, then lets go of them and of
    // the store, which a new proxy in the same process then opens.
    proxy.stop().await.unwrap();
    hold.store(false, Ordering::SeqCst);
    gates.release();
    let proxy = TestProxy::start(&upstream, &extra).await;
    let summary = python_sdk(&proxy.addr.to_string(), "k", &["wait", &batch_id]).await;
    assert_eq!(summary["batch"]["status"], "completed", "{summary}");
    assert_eq!(
        custom_ids(&jsonl(&summary["output"])),
        numbered("line", 1..=5)
    );
    let sent = sent_per_line(&upstream);
    assert_eq!(
        (sent[&1], sent[&2]),
        (1, 1),
        "answered lines are not sent again: {sent:?}"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_reload_keeps_the_running_batch_api_and_says_so() {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let store = store_dir();
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        upstream.url(),
        key.display()
    );
    let path = temp_file(
        "proxy.toml",
        &format!("{base}[batch]\nstore = \"{}\"\n", store.display()),
    );
    let (proxy, trigger) = start_live_proxy(&path).await;

    // [batch] removed from the file: the reload applies the rest and names `batch` as pending.
    std::fs::write(&path, format!("{base}[cache]\nmax_entry_bytes = 1024\n")).unwrap();
    trigger.reload();
    let config_url = proxy.admin_url("/config");
    wait_until_async("the reload to name batch as restart-only", || async {
        let (_, _, body) = read_all(send("GET", &config_url, &[], "").await).await;
        let config: Value = serde_json::from_slice(&body).unwrap();
        config["restart_pending"]
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k == "batch"))
    })
    .await;
    // The Batch API keeps answering from its store; nothing went upstream.
    let (status, _, body) = read_all(send("GET", &proxy.url("/v1/batches"), &[], "").await).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["object"],
        "list"
    );
    assert_eq!(upstream.request_count(), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn after_a_restart_a_pass_through_owners_lines_wait_for_its_key() {
    // Every line is held while `hold` is set.
    let gates = Gates::default();
    let hold = Arc::new(AtomicBool::new(true));
    let (held, holding) = (gates.clone(), hold.clone());
    let upstream = MockUpstream::start(move |request| {
        if holding.load(Ordering::SeqCst) {
            held.hold(answer(request))
        } else {
            answer(request)
        }
    })
    .await;
    let store = store_dir();
    let extra = format!(
        "[server]\nshutdown_grace = \"100ms\"\n[upstream]\nauth = \"passthrough\"\n\
         [batch]\nstore = \"{}\"\nconcurrency = 3\nretry_base = \"20ms\"\nmax_retries = 20\n",
        store.display()
    );
    let proxy = TestProxy::start(&upstream, &extra).await;
    let batch_id = sdk_create_batch(&proxy.addr.to_string(), "sk-or-key-a", 3).await;
    upstream.wait_requests(3).await;
    proxy.stop().await.unwrap();
    hold.store(false, Ordering::SeqCst);
    gates.release();

    // The new process does not know the owner's key: its lines are retried, never sent keyless.
    let proxy = TestProxy::start(&upstream, &extra).await;
    let retried = "openrouter_batch_lines_total{status=\"retried\"}";
    wait_until_async("lines retried for want of the key", || async {
        proxy.metric(retried).await.is_some_and(|n| n >= 3.0)
    })
    .await;
    assert_eq!(upstream.request_count(), 3);
    // The owner polls: its key is known again and the lines run with it.
    let summary = python_sdk(&proxy.addr.to_string(), "sk-or-key-a", &["wait", &batch_id]).await;
    assert_eq!(summary["batch"]["status"], "completed", "{summary}");
    assert_eq!(
        custom_ids(&jsonl(&summary["output"])),
        numbered("line", 1..=3)
    );
    let sent = upstream.requests();
    assert_eq!(sent.len(), 6);
    assert!(sent
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer sk-or-key-a")));
    proxy.stop().await.unwrap();
}
