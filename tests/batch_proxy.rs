//! The Batch API in the real binary: the official OpenAI Python SDK uploads and creates batches
//! on the proxy's own socket, the lines run through the proxy's pipeline (routes, model rewrite,
//! retries) to a scripted mock upstream, ownership follows the inbound token, and a proxy killed
//! with SIGKILL mid-batch resumes on the same store without sending again a line whose answer
//! had arrived.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::batch::{custom_ids, input_file, jsonl, numbered, numbered_lines, store_dir, Gates};
use common::batch_proxy::*;
use common::*;
use serde_json::Value;

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
    check_access_log(&logs, batch_id);
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
    let batch_id = sdk_create_batch(&proxy.api, ALICE, 20).await;

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

/// Every batch line's access-log line names its batch, its owner and its route; the Batch API's
/// own calls have lines too (the upload, the creation, another caller's 404, a refused caller).
fn check_access_log(logs: &[String], batch_id: &str) {
    let requests: Vec<Value> = logs
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == "request")
        .collect();
    let lines: Vec<&Value> = requests.iter().filter(|e| e["batch_id"] != "").collect();
    assert!(lines.len() >= 200, "{} batch access lines", lines.len());
    for event in &lines {
        assert_eq!(event["batch_id"], batch_id, "{event}");
        assert_eq!(event["caller"], "alice", "{event}");
        assert_eq!(event["route"], "batchy", "{event}");
    }
    // The Batch API calls have their own lines too: the upload, the refused caller.
    let api = |method: &str, path: &str, caller: &str, status: u16| {
        requests.iter().any(|e| {
            e["route"] == "batch_api"
                && e["method"] == method
                && e["path"] == path
                && e["caller"] == caller
                && e["status"] == status
        })
    };
    assert!(
        api("POST", "/v1/files", "alice", 200),
        "{:?}",
        requests.last()
    );
    assert!(api("POST", "/v1/batches", "alice", 200));
    assert!(api("GET", &format!("/v1/batches/{batch_id}"), "bob", 404));
    assert!(api("GET", "/v1/batches", "", 401));
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_stops_the_start_with_a_clear_error() {
    let upstream = MockUpstream::openai_like().await;
    // A regular file where the store's directory should be.
    let store = temp_file("not-a-directory", "");
    let config = binary_config(&upstream, &store, "");
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let (status, logs) = proxy.wait().await;
    assert!(!status.success(), "{status:?}");
    let error = logs
        .iter()
        .find(|line| line.contains("cannot open the batch store"))
        .unwrap_or_else(|| panic!("no error line: {logs:?}"));
    assert!(error.contains(store.to_str().unwrap()), "{error}");
}
