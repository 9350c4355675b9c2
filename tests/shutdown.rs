//! The real binary under SIGTERM: readiness turns 503, new connections are refused, an open stream
//! finishes (on one serving thread or on the second of two), a connection busy when the drain
//! began is closed after its answer, and the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;
use tokio::sync::mpsc;

/// The real binary in front of a mock upstream whose one answer is a stream the test feeds
/// through the returned sender; `server` holds keys of `[server]`.
async fn binary_with_a_stream(server: &str) -> (MockUpstream, mpsc::Sender<Step>, BinaryProxy) {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let config = proxy_config_file(&upstream.url(), &format!("[server]\n{server}"));
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    (upstream, tx, proxy)
}

async fn sigterm_drains_an_open_stream(worker_threads: usize) {
    let (_upstream, tx, proxy) = binary_with_a_stream(&format!(
        "worker_threads = {worker_threads}\ndrain_delay = \"0s\"\nshutdown_grace = \"60s\"\n"
    ))
    .await;
    let (api, admin) = (proxy.api.clone(), proxy.admin.clone());
    // Accepted first (the accept queue keeps the order of connects): with two serving threads it
    // takes the first and the stream's connection the second.
    let idle = tokio::net::TcpStream::connect(&api).await.unwrap();
    let (_sender, _, mut body) = open_stream(&api, &tx).await;

    proxy.signal("TERM").await;

    wait_not_ready(&admin).await;
    let refused = tokio::time::timeout(PATIENCE, async {
        while tokio::net::TcpStream::connect(&api).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "new connections were still accepted while draining"
    );

    tx.send(data(&chunk_event("m", "after"))).await.unwrap();
    tx.send(data("data: [DONE]\n\n")).await.unwrap();
    drop(tx);
    let rest = read_until(&mut body, "[DONE]").await;
    assert!(rest.contains("after"), "the open stream was cut: {rest}");
    assert!(next_data(&mut body).await.is_none());
    drop(idle);

    let (status, logs) = proxy.wait().await;
    assert!(status.success(), "exit status {status}");
    let access = logs
        .iter()
        .find(|l| l.contains("\"request\""))
        .expect("an access-log line");
    let access: serde_json::Value = serde_json::from_str(access).unwrap();
    assert_eq!(access["status"], 200);
    assert_eq!(access["outcome"], "complete");
    assert!(
        logs.iter().all(|l| !l.contains(TEST_KEY)),
        "the key leaked into the logs"
    );
}

#[tokio::test]
async fn sigterm_drains_an_open_stream_then_exits_zero() {
    sigterm_drains_an_open_stream(1).await;
}

#[tokio::test]
async fn sigterm_drains_a_stream_on_the_second_serving_thread_then_exits_zero() {
    sigterm_drains_an_open_stream(2).await;
}

/// A keep-alive connection whose answer was still streaming when the drain began is closed by the
/// proxy right after that answer, not left open until its idle (header-read) timeout.
#[tokio::test]
async fn a_connection_busy_when_the_drain_begins_is_closed_after_its_answer() {
    let (_upstream, tx, proxy) = binary_with_a_stream(
        "drain_delay = \"0s\"\nshutdown_grace = \"600s\"\nheader_read_timeout = \"600s\"\n",
    )
    .await;
    let (sender, connection, mut body) = open_stream(&proxy.api, &tx).await;

    proxy.signal("TERM").await;
    wait_not_ready(&proxy.admin).await;
    tx.send(data("data: [DONE]\n\n")).await.unwrap();
    drop(tx);
    read_until(&mut body, "[DONE]").await;
    assert!(next_data(&mut body).await.is_none());
    // The client keeps its end open: only the proxy can end the connection now.
    let closed = tokio::time::timeout(PATIENCE, connection).await;
    assert!(
        closed.is_ok(),
        "the proxy kept the drained connection open after its answer"
    );
    drop(sender);
    let (status, _) = proxy.wait().await;
    assert!(status.success(), "exit status {status}");
}
