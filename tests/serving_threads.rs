//! The real binary with `server.worker_threads = 2`: client connections are spread over the
//! serving threads (the fewest open first) and each thread keeps its own upstream connections.
//! (`tests/shutdown.rs` drains a stream open on the second thread.)
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;

async fn chat(sender: &mut SendRequest<Full<Bytes>>, api: &str) {
    sender.ready().await.unwrap();
    let response = tokio::time::timeout(PATIENCE, sender.send_request(chat_post(api, false)))
        .await
        .expect("no answer in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "not a chat answer: {body:?}");
}

/// How many connections the upstream holds open after two client connections took turns with
/// seven requests, one at a time, through a proxy with `threads` serving threads.
async fn upstream_connections_after_turns(threads: usize) -> usize {
    let upstream = KillableUpstream::start(openai_like_reply).await;
    let config = proxy_config_file(
        &upstream.url(),
        &format!("[server]\nworker_threads = {threads}\n"),
    );
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let (mut first, _) = own_connection(&proxy.api).await;
    // Answered, so accepted (and placed) before the second connection is made.
    chat(&mut first, &proxy.api).await;
    let (mut second, _) = own_connection(&proxy.api).await;
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
