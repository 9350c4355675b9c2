//! The real binary's JSON access log on standard output: lines gathered in a buffer
//! (`[log] access_buffer_bytes`) reach standard output on the flush timer while the proxy runs,
//! when the buffer fills, and when the proxy stops, whatever is left; one line per request.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;
use serde_json::Value;

/// Starts the binary in front of an OpenAI-like mock with `[log]` settings `log`; with the
/// request ids `<prefix>-0` .. `<prefix>-<count - 1>` for the test to send.
async fn proxy_with_log(
    log: &str,
    prefix: &str,
    count: usize,
) -> (MockUpstream, BinaryProxy, Vec<String>) {
    let upstream = MockUpstream::openai_like().await;
    let extra = format!("[server]\ndrain_delay = \"0s\"\n[log]\n{log}\n");
    let config = proxy_config_file(&upstream.url(), &extra);
    let proxy = BinaryProxy::spawn(&config, &["--no-watch"]).await;
    let ids = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    (upstream, proxy, ids)
}

/// One chat request with request id `id`, answered 200.
async fn chat(proxy: &BinaryProxy, id: &str) {
    let url = format!("http://{}/v1/chat/completions", proxy.api);
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
    let headers = [("x-request-id", id)];
    let (status, _, _) = post_json(&url, body, &headers).await;
    assert_eq!(status, 200);
}

/// The request ids of the access lines among `lines`, in the order written.
fn access_ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .map(|line| line["request_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends a chat request with each of `ids`, one after the other.
async fn chat_each(proxy: &BinaryProxy, ids: &[String]) {
    for id in ids {
        chat(proxy, id).await;
    }
}

/// Stops the proxy with SIGTERM; the access lines' request ids it wrote, once it exited cleanly.
async fn stop(proxy: BinaryProxy) -> Vec<String> {
    proxy.signal("TERM").await;
    let (status, lines) = proxy.wait().await;
    assert!(status.success(), "{status}");
    access_ids(&lines)
}

#[tokio::test]
async fn lines_left_in_the_buffer_are_written_when_the_proxy_stops() {
    // Neither the timer (an hour) nor the buffer (64 KiB, about a hundred lines) writes them.
    let log = "access_flush_interval = \"1h\"";
    let (_upstream, proxy, sent) = proxy_with_log(log, "at-stop", 5).await;
    chat_each(&proxy, &sent).await;
    assert_eq!(stop(proxy).await, sent);
}

#[tokio::test]
async fn the_timer_writes_the_lines_of_a_quiet_proxy() {
    let log = "access_flush_interval = \"100ms\"";
    let (_upstream, proxy, sent) = proxy_with_log(log, "timer", 3).await;
    chat_each(&proxy, &sent).await;
    // Nothing more is sent: only the timer can write them.
    wait_until("the access lines", || access_ids(&proxy.logged()) == sent).await;
    assert_eq!(stop(proxy).await, sent);
}

#[tokio::test]
async fn a_full_buffer_is_written_at_once() {
    // About 600 bytes a line: the buffer fills within a few requests, and the timer never runs.
    let log = "access_buffer_bytes = 2000\naccess_flush_interval = \"1h\"";
    let (_upstream, proxy, sent) = proxy_with_log(log, "full", 20).await;
    chat_each(&proxy, &sent).await;
    // Lines are longer than 200 bytes: at least every tenth line fills the buffer, so half of
    // them are out while the proxy runs, in order.
    wait_until("most access lines", || {
        access_ids(&proxy.logged()).len() >= 10
    })
    .await;
    let written = access_ids(&proxy.logged());
    assert_eq!(written, sent[..written.len()]);
    assert_eq!(stop(proxy).await, sent);
}

#[tokio::test]
async fn without_a_buffer_each_line_is_written_as_its_request_ends() {
    let log = "access_buffer_bytes = 0\naccess_flush_interval = \"1h\"";
    let (_upstream, proxy, sent) = proxy_with_log(log, "unbuffered", 3).await;
    for id in &sent {
        chat(&proxy, id).await;
        wait_until("the request's line", || {
            access_ids(&proxy.logged()).contains(id)
        })
        .await;
    }
    assert_eq!(stop(proxy).await, sent);
}
