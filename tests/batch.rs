//! The Batch API end to end: the official OpenAI Python SDK uploads, creates, polls, cancels and
//! downloads against the batch service on a real socket, whose lines go over HTTP to a scripted
//! mock upstream; the store is the embedded one on a fresh directory per test.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::batch::*;
use common::*;
use openrouter_proxy::config::BatchConfig;
use serde_json::Value;

const ALICE: &str = "alice";

fn counts(batch: &Value) -> (u64, u64, u64) {
    let c = &batch["request_counts"];
    (
        c["total"].as_u64().unwrap(),
        c["completed"].as_u64().unwrap(),
        c["failed"].as_u64().unwrap(),
    )
}

fn path(input: &std::path::Path) -> &str {
    input.to_str().unwrap()
}

#[tokio::test]
async fn two_hundred_lines_run_to_completion() {
    openrouter_proxy::record::metrics::handle();
    let upstream = MockUpstream::start(|request| answer_for(&custom_id(request))).await;
    let server = BatchServer::start(batch_config(&store_dir()), &upstream).await;
    let input = input_file(&numbered_lines("line", 200));

    let summary = python_batch(&server, ALICE, &["run", path(&input)]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(counts(batch), (200, 200, 0));
    assert_eq!(batch["error_file_id"], Value::Null);
    let stamps: Vec<u64> = [
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
    ]
    .iter()
    .map(|key| batch[key].as_u64().unwrap())
    .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    let output = jsonl(&summary["output"]);
    assert_eq!(custom_ids(&output), numbered("line", 1..=200));
    for line in &output {
        let id = line["custom_id"].as_str().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(
            line["response"]["body"]["choices"][0]["message"]["content"],
            format!("answer to {id}")
        );
        assert_eq!(line["error"], Value::Null);
    }
    let sent = upstream.requests();
    assert_eq!(sent.len(), 200);
    for request in &sent {
        assert_eq!(request.path_and_query, "/api/v1/chat/completions");
        assert!(
            request.json().get("stream").is_none(),
            "lines are never streamed"
        );
    }
    let rendered = openrouter_proxy::record::metrics::handle().render();
    let succeeded = rendered
        .lines()
        .find(|l| l.starts_with("openrouter_batch_lines_total{status=\"succeeded\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(succeeded.is_some_and(|n| n >= 200.0), "{rendered}");
    server.stop().await;
}

#[tokio::test]
async fn retryable_answers_back_off_and_a_client_error_is_reported() {
    let arrivals: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let seen = arrivals.clone();
    let upstream = MockUpstream::start(move |request| {
        let id = custom_id(request);
        let mut seen = seen.lock().unwrap();
        seen.push((id.clone(), Instant::now()));
        let tries = seen.iter().filter(|(i, _)| *i == id).count();
        match (id.as_str(), tries) {
            ("flaky", 1 | 2) => Reply::Json(429, r#"{"error":{"message":"slow down"}}"#.into()),
            ("cut", 1) => Reply::Close,
            ("bad", _) => Reply::Json(400, r#"{"error":{"message":"bad request"}}"#.into()),
            _ => answer_for(&id),
        }
    })
    .await;
    let server = BatchServer::start(batch_config(&store_dir()), &upstream).await;
    let input = input_file(&["ok", "flaky", "bad", "cut"].map(|id| chat_line(id, "q")));

    let summary = python_batch(&server, ALICE, &["run", path(&input)]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(counts(batch), (4, 3, 1));
    let output = jsonl(&summary["output"]);
    assert_eq!(custom_ids(&output), ["cut", "flaky", "ok"]);
    let errors = jsonl(&summary["error"]);
    assert_eq!(custom_ids(&errors), ["bad"]);
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["message"],
        "bad request"
    );

    server.stop().await;
    let arrivals = arrivals.lock().unwrap().clone();
    let times = |id: &str| -> Vec<Instant> {
        arrivals
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, t)| *t)
            .collect()
    };
    let flaky = times("flaky");
    assert_eq!(flaky.len(), 3, "two 429s, then the answer");
    // Retry n waits at least half of 50 ms x 2^(n-1).
    assert!(flaky[1] - flaky[0] >= Duration::from_millis(25));
    assert!(flaky[2] - flaky[1] >= Duration::from_millis(50));
    assert_eq!(times("bad").len(), 1, "a 4xx is not retried");
    assert_eq!(times("cut").len(), 2, "no answer is retried");
}

#[tokio::test]
async fn cancel_in_the_middle_keeps_finished_lines_and_reports_the_rest() {
    let (upstream, gates) = upstream_holding_after(5).await;
    let server = BatchServer::start(config_with(2), &upstream).await;
    let (id, _) = create_batch(&server, ALICE, &numbered_lines("line", 20)).await;
    wait_for_batch(&server, ALICE, |b| b["request_counts"]["completed"] == 5).await;
    // Two lines are in flight when the batch is cancelled; they still finish.
    upstream.wait_requests(7).await;
    let cancelling = python_batch(&server, ALICE, &["cancel", &id]).await;
    assert_eq!(cancelling["status"], "cancelling");
    gates.release();
    let summary = python_batch(&server, ALICE, &["wait", &id]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert!(batch["cancelling_at"].as_u64() <= batch["cancelled_at"].as_u64());
    assert_eq!(counts(batch), (20, 7, 13));
    let output = jsonl(&summary["output"]);
    assert_eq!(custom_ids(&output), numbered("line", 1..=7));
    let errors = jsonl(&summary["error"]);
    assert_eq!(custom_ids(&errors), numbered("line", 8..=20));
    let never_run = |e: &Value| e["error"]["code"] == "batch_cancelled" && e["response"].is_null();
    assert!(errors.iter().all(never_run), "{errors:?}");
    assert_eq!(
        upstream.request_count(),
        7,
        "nothing is sent after cancelling"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_batch_past_its_window_expires_and_retention_removes_it() {
    let (upstream, gates) = upstream_holding_after(3).await;
    let server = BatchServer::start(config_with(2), &upstream).await;
    let (id, file) = create_batch(&server, ALICE, &numbered_lines("line", 10)).await;
    wait_for_batch(&server, ALICE, |b| b["request_counts"]["completed"] == 3).await;
    upstream.wait_requests(5).await;
    server.clock.advance(Duration::from_secs(25 * 3600));
    gates.release();
    let summary = python_batch(&server, ALICE, &["wait", &id]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "expired", "{batch}");
    assert!(batch["expired_at"].as_u64() > batch["expires_at"].as_u64());
    assert_eq!(counts(batch), (10, 5, 5));
    let output = jsonl(&summary["output"]);
    assert_eq!(custom_ids(&output), numbered("line", 1..=5));
    let errors = jsonl(&summary["error"]);
    assert_eq!(custom_ids(&errors), numbered("line", 6..=10));
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_expired"));
    assert_eq!(upstream.request_count(), 5);

    server.clock.advance(Duration::from_secs(8 * 24 * 3600));
    let deadline = Instant::now() + PATIENCE;
    while server.get(ALICE, &format!("/v1/batches/{id}")).await.0 != 404 {
        assert!(
            Instant::now() < deadline,
            "retention never removed the batch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.get(ALICE, &format!("/v1/files/{file}")).await.0, 404);
    let (_, files) = server.get(ALICE, "/v1/files").await;
    assert_eq!(files["data"], Value::Array(vec![]), "{files}");
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_file_fails_the_batch_with_line_errors() {
    let upstream = MockUpstream::start(|request| answer_for(&custom_id(request))).await;
    let server = BatchServer::start(batch_config(&store_dir()), &upstream).await;
    let lines = [
        chat_line("a", "q"),
        "{this is not json".to_owned(),
        chat_line("a", "again"),
        chat_line("b", "q").replace("/v1/chat/completions", "/v1/embeddings"),
        r#"{"custom_id":"c","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#
            .to_owned(),
    ];

    let summary = python_batch(&server, ALICE, &["run", path(&input_file(&lines))]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "failed", "{batch}");
    assert!(batch["failed_at"].as_u64().is_some());
    let errors: Vec<(&str, u64)> = batch["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(!e["message"].as_str().unwrap().is_empty());
            (e["code"].as_str().unwrap(), e["line"].as_u64().unwrap())
        })
        .collect();
    let expected = [
        ("invalid_json_line", 2),
        ("duplicate_custom_id", 3),
        ("invalid_url", 4),
        ("missing_required_parameter", 5),
    ];
    assert_eq!(errors, expected);
    assert_eq!(counts(batch), (0, 0, 0));
    assert_eq!(summary["output"], Value::Null);
    assert_eq!(upstream.request_count(), 0);
    server.stop().await;
}

#[tokio::test]
async fn batches_and_files_belong_to_their_owner() {
    let upstream = MockUpstream::start(|request| answer_for(&custom_id(request))).await;
    let server = BatchServer::start(batch_config(&store_dir()), &upstream).await;
    let input = input_file(&[chat_line("only", "q")]);

    // Three batches listed two per page, newest first.
    let listed = python_batch(&server, ALICE, &["pages", path(&input), "3"]).await;
    assert_eq!(listed["ids"].as_array().unwrap().len(), 3);
    let (batch, file) = create_batch(&server, ALICE, &[chat_line("only", "q")]).await;
    python_batch(&server, "bob", &["foreign", &batch, &file]).await;

    let (status, mine) = server.get(ALICE, &format!("/v1/batches/{batch}")).await;
    assert_eq!((status, mine["id"].as_str()), (200, Some(batch.as_str())));
    server.stop().await;
}

#[tokio::test]
async fn size_and_line_limits_are_clear_errors() {
    let upstream = MockUpstream::start(|request| answer_for(&custom_id(request))).await;
    let config = BatchConfig {
        max_file_bytes: 2000,
        max_lines: 5,
        ..batch_config(&store_dir())
    };
    let server = BatchServer::start(config, &upstream).await;
    let big = input_file(&numbered_lines("big", 40));
    let many = input_file(&numbered_lines("many", 6));

    let errors = python_batch(&server, ALICE, &["limits", path(&big), path(&many)]).await;

    let message = |key: &str| errors[key]["message"].as_str().unwrap().to_owned();
    assert_eq!(errors["too_large"]["code"], "file_too_large", "{errors}");
    assert!(message("too_large").contains("2000 bytes"));
    assert_eq!(errors["too_many"]["param"], "input_file_id");
    assert!(message("too_many").contains("at most 5"));
    assert_eq!(errors["wrong_endpoint"]["param"], "endpoint");
    let (_, files) = server.get(ALICE, "/v1/files").await;
    assert_eq!(
        files["data"],
        Value::Array(vec![]),
        "the refused upload left nothing"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_without_losing_or_resending_a_line() {
    let restarted = Arc::new(AtomicBool::new(false));
    let after_restart: Arc<Mutex<Vec<String>>> = Arc::default();
    let gates = Gates::default();
    let (phase, seen, held) = (restarted.clone(), after_restart.clone(), gates.clone());
    let upstream = MockUpstream::start(move |request| {
        let id = custom_id(request);
        if phase.load(Ordering::SeqCst) {
            seen.lock().unwrap().push(id.clone());
            answer_for(&id)
        } else if line_number(&id) <= 10 {
            answer_for(&id)
        } else {
            // Never answered before the stop: these are in flight when it comes.
            held.hold(answer_for(&id))
        }
    })
    .await;
    let config = config_with(2);
    let first = BatchServer::start(config.clone(), &upstream).await;
    let (id, _) = create_batch(&first, ALICE, &numbered_lines("line", 30)).await;
    wait_for_batch(&first, ALICE, |b| b["request_counts"]["completed"] == 10).await;
    upstream.wait_requests(12).await;
    first.stop().await;
    gates.release();

    restarted.store(true, Ordering::SeqCst);
    let second = BatchServer::start(config, &upstream).await;
    let summary = python_batch(&second, ALICE, &["wait", &id]).await;

    let batch = &summary["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(counts(batch), (30, 30, 0));
    let output = jsonl(&summary["output"]);
    assert_eq!(custom_ids(&output), numbered("line", 1..=30));
    let mut resent = after_restart.lock().unwrap().clone();
    resent.sort();
    let unsettled = numbered("line", 11..=30);
    assert_eq!(resent, unsettled, "committed lines are not sent again");
    second.stop().await;
}

#[tokio::test]
async fn batch_work_waits_while_live_traffic_is_high() {
    let upstream = MockUpstream::start(|request| answer_for(&custom_id(request))).await;
    let server = BatchServer::start(batch_config(&store_dir()), &upstream).await;
    server.live.store(65, Ordering::SeqCst);
    let (id, _) = create_batch(&server, ALICE, &numbered_lines("line", 5)).await;
    wait_for_batch(&server, ALICE, |b| b["status"] == "in_progress").await;
    // Above `yield_above` nothing may be sent, however long the batch waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.request_count(), 0);

    server.live.store(64, Ordering::SeqCst);
    let summary = python_batch(&server, ALICE, &["wait", &id]).await;
    assert_eq!(summary["batch"]["status"], "completed");
    assert_eq!(upstream.request_count(), 5);
    server.stop().await;
}

#[tokio::test]
async fn running_batches_take_turns() {
    let gates = Gates::default();
    let held = gates.clone();
    let upstream = MockUpstream::start(move |request| match custom_id(request).as_str() {
        "a-1" => held.hold(answer_for("a-1")),
        id => answer_for(id),
    })
    .await;
    let server = BatchServer::start(config_with(1), &upstream).await;
    let (a, _) = create_batch(&server, ALICE, &numbered_lines("a", 4)).await;
    upstream.wait_requests(1).await;
    let (b, _) = create_batch(&server, ALICE, &numbered_lines("b", 4)).await;
    wait_for_batch(&server, ALICE, |b| b["status"] == "in_progress").await;
    gates.release();
    for id in [&a, &b] {
        let summary = python_batch(&server, ALICE, &["wait", id]).await;
        assert_eq!(summary["batch"]["status"], "completed");
    }

    let order: Vec<String> = upstream.requests().iter().map(custom_id).collect();
    assert_eq!(
        order,
        ["a-1", "a-2", "b-1", "a-3", "b-2", "a-4", "b-3", "b-4"],
        "one line of each running batch in turn"
    );
    server.stop().await;
}
