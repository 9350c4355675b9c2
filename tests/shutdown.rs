//! The real binary under SIGTERM: readiness turns 503, new connections are refused, an open stream
//! finishes, and the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;

#[tokio::test]
async fn sigterm_drains_an_open_stream_then_exits_zero() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let config = proxy_config_file(
        &upstream.url(),
        "[server]\ndrain_delay = \"0s\"\nshutdown_grace = \"60s\"\n",
    );
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let (api, admin) = (proxy.api.clone(), proxy.admin.clone());

    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    let response = send(
        "POST",
        &format!("http://{api}/v1/chat/completions"),
        &[("content-type", "application/json")],
        body,
    )
    .await;
    let mut body = response.into_body();
    tx.send(data(&chunk_event("m", "before"))).await.unwrap();
    read_until(&mut body, "before").await;

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
