//! The Batch API shared over Redis: two replicas of the binary on one redis-server work one batch
//! together (uploaded through one with the official Python SDK, followed and downloaded through
//! the other), no line sent twice; a replica SIGKILLed with lines in flight has them claimed by
//! the other after `claim_after`, and the batch completes with every custom_id once.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::batch::{custom_ids, jsonl, numbered, Gates};
use common::batch_proxy::*;
use common::redis::RedisServer;
use common::replicas::{replica_config, start_replica, stop};
use common::*;
use serde_json::Value;

/// A mock that holds every answer while `hold` is set.
async fn holding_upstream() -> (MockUpstream, Gates, Arc<AtomicBool>) {
    let (gates, hold) = (Gates::default(), Arc::new(AtomicBool::new(true)));
    let (held, holding) = (gates.clone(), hold.clone());
    let upstream = MockUpstream::start(move |request| {
        if holding.load(Ordering::SeqCst) {
            held.hold(answer(request))
        } else {
            answer(request)
        }
    })
    .await;
    (upstream, gates, hold)
}

/// Two replicas' config: tokens, the rewriting route, and `[batch]` with four lines in flight
/// per replica and `claim_after`.
fn config(server: &RedisServer, upstream: &MockUpstream, claim_after: &str) -> std::path::PathBuf {
    let extra = format!(
        "{}{}{ROUTE}\n[batch]\nconcurrency = 4\nretry_base = \"20ms\"\nclaim_after = \"{claim_after}\"\n",
        token("alice", ALICE),
        token("bob", BOB),
    );
    replica_config(server, &upstream.url(), "2s", &extra)
}

/// The batch's access-log lines in a replica's log.
fn batch_lines(logs: &[String], batch_id: &str) -> usize {
    logs.iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == "request" && event["batch_id"] == batch_id)
        .count()
}

fn check_output(summary: &Value, lines: usize) {
    let batch = &summary["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    let total = lines as u64;
    assert_eq!(counts(batch), (total, total, 0));
    let output = jsonl(&summary["output"]);
    assert_eq!(
        custom_ids(&output),
        numbered("line", 1..=lines),
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
}

#[tokio::test]
async fn two_replicas_share_one_batch_with_no_line_done_twice() {
    let server = RedisServer::start().await;
    let (upstream, gates, hold) = holding_upstream().await;
    let config = config(&server, &upstream, "5m");
    let (a, b) = (start_replica(&config).await, start_replica(&config).await);
    let batch_id = sdk_create_batch(&a.api, ALICE, 200).await;
    // Eight answers held at once: four lines in flight per replica at most, so both work it.
    upstream.wait_requests(8).await;
    hold.store(false, Ordering::SeqCst);
    gates.release();
    let summary = python_sdk(&b.api, ALICE, &["wait", &batch_id]).await;
    check_output(&summary, 200);
    let sent = sent_per_line(&upstream);
    assert!(
        (1..=200).all(|n| sent.get(&n) == Some(&1)),
        "a line was sent twice or never: {sent:?}"
    );
    assert_eq!(upstream.requests().len(), 200);
    let (logs_a, logs_b) = (stop(a).await, stop(b).await);
    let (ran_a, ran_b) = (
        batch_lines(&logs_a, &batch_id),
        batch_lines(&logs_b, &batch_id),
    );
    assert!(ran_a > 0 && ran_b > 0, "A ran {ran_a} lines, B {ran_b}");
    assert_eq!(ran_a + ran_b, 200);
    assert!(logs_a
        .iter()
        .chain(&logs_b)
        .any(|line| line.contains("\"store\":\"redis\"")));
}

#[tokio::test]
async fn lines_of_a_killed_replica_are_claimed_by_the_other() {
    let server = RedisServer::start().await;
    let (upstream, gates, hold) = holding_upstream().await;
    let config = config(&server, &upstream, "2s");
    let (a, b) = (start_replica(&config).await, start_replica(&config).await);
    let batch_id = sdk_create_batch(&a.api, ALICE, 40).await;
    upstream.wait_requests(8).await;
    a.signal("KILL").await;
    let (status, _) = a.wait().await;
    assert!(!status.success(), "{status:?}");
    hold.store(false, Ordering::SeqCst);
    gates.release();
    let summary = python_sdk(&b.api, ALICE, &["wait", &batch_id]).await;
    check_output(&summary, 40);
    // The four lines A held were sent again by B; every other line once.
    let sent = sent_per_line(&upstream);
    let twice = sent.values().filter(|n| **n == 2).count();
    assert_eq!(twice, 4, "{sent:?}");
    assert!(
        (1..=40).all(|n| matches!(sent.get(&n), Some(1 | 2))),
        "{sent:?}"
    );
    stop(b).await;
}
