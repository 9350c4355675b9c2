//! The real binary with `server.worker_threads = 2`: each serving thread runs its own event loop,
//! client connections are spread over the threads (the fewest open first), each thread keeps its
//! own upstream connections, and SIGTERM drains a stream open on the second thread before the
//! process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One client connection of its own to the proxy at `api`.
async fn connect(api: &str) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(api).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn chat(sender: &mut SendRequest<Full<Bytes>>, api: &str) {
    let request = Request::post(format!("http://{api}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    sender.ready().await.unwrap();
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("no answer in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "not a chat answer: {body:?}");
}

/// How many connections the upstream holds open after two client connections took turns with
/// six requests, one at a time, through a proxy with `threads` serving threads.
async fn upstream_connections_after_turns(threads: usize) -> usize {
    let upstream = KillableUpstream::start(openai_like_reply).await;
    let config = proxy_config_file(
        &upstream.url(),
        &format!("[server]\nworker_threads = {threads}\n"),
    );
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let mut first = connect(&proxy.api).await;
    // Answered, so accepted (and placed) before the second connection is made.
    chat(&mut first, &proxy.api).await;
    let mut second = connect(&proxy.api).await;
    for _ in 0..3 {
        chat(&mut second, &proxy.api).await;
        chat(&mut first, &proxy.api).await;
    }
    assert_eq!(upstream.request_count(), 7);
    upstream.open_connections()
}

#[tokio::test]
async fn each_serving_thread_keeps_its_own_upstream_connections() {
    // One thread: one pool, the one upstream connection serves both clients in turn.
    assert_eq!(upstream_connections_after_turns(1).await, 1);
    // Two threads: the second client connection went to the second thread, whose requests go
    // out on a connection of its own; neither thread opened more than one.
    assert_eq!(upstream_connections_after_turns(2).await, 2);
}

#[tokio::test]
async fn sigterm_drains_a_stream_on_the_second_thread_then_exits_zero() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let config = proxy_config_file(
        &upstream.url(),
        "[server]\nworker_threads = 2\ndrain_delay = \"0s\"\nshutdown_grace = \"60s\"\n",
    );
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let (api, admin) = (proxy.api.clone(), proxy.admin.clone());
    // Accepted first (the accept queue keeps the order of connects), so it takes the first
    // thread and the stream's connection the second.
    let idle = tokio::net::TcpStream::connect(&api).await.unwrap();
    let mut streaming = connect(&api).await;
    let request = Request::post(format!("http://{api}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","stream":true,"messages":[]}"#,
        )))
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, streaming.send_request(request))
        .await
        .expect("no answer in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    tx.send(data(&chunk_event("m", "before"))).await.unwrap();
    read_until(&mut body, "before").await;

    proxy.signal("TERM").await;
    wait_not_ready(&admin).await;
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
}
