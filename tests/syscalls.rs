//! The write system calls the real binary makes per proxied request on a keep-alive connection
//! (from `/proc/<pid>/io`): one to the upstream and one to the client, nothing else. Tokio wakes
//! its time driver through an eventfd (one more write) whenever a timer is set to fire before
//! the driver's planned wake-up, which the timers of every request did until the proxy kept a
//! near timer of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The write-family system calls process `pid` has made (`syscw` in `/proc/<pid>/io`).
fn write_calls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|line| line.strip_prefix("syscw: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("no syscw in /proc/<pid>/io")
}

/// One chat request on `stream`, written as many HTTP clients write it (the head, then the body
/// in a write of its own), and its whole answer read.
async fn chat(stream: &mut TcpStream) {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "closed mid-answer");
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        if answer.len() >= end + 4 + length {
            return;
        }
    }
}

#[tokio::test]
async fn a_proxied_request_costs_two_writes() {
    // An upstream that takes a moment, as every real one does: the proxy waits for it with
    // nothing else to do.
    let upstream = MockUpstream::start(|request| {
        Reply::After(
            Duration::from_millis(2),
            Box::new(openai_like_reply(request)),
        )
    })
    .await;
    // At this level the access log is off: no write to standard output per request; without
    // its buffer there is no flush timer either (a timer of its own, measured on its own).
    let config = proxy_config_file(
        &upstream.url(),
        "[server]\ndrain_delay = \"0s\"\n[log]\nlevel = \"warn,openrouter_proxy=info\"\naccess_buffer_bytes = 0\n",
    );
    let proxy = BinaryProxy::spawn(&config, &["--no-watch"]).await;
    let pid = proxy.child.id().unwrap();
    // Without TCP_NODELAY the body waits for the head's (delayed) acknowledgement, as it does
    // for many clients: the proxy then waits for the body with its body-read timer set, and,
    // depending on where the deadlines fall in Tokio's timer wheel, the timers it sets next wake
    // its time driver. 300 such requests take several seconds, enough to meet those cases (110
    // extra writes without the proxy's own timer, none with it).
    let mut stream = TcpStream::connect(&proxy.api).await.unwrap();
    for _ in 0..20 {
        chat(&mut stream).await;
    }
    let requests = 300;
    let (before, started) = (write_calls(pid), Instant::now());
    for _ in 0..requests {
        chat(&mut stream).await;
    }
    let writes = write_calls(pid) - before;
    // The proxy's own timer wakes it about once a second; a few more for slack.
    let seconds = started.elapsed().as_secs() + 1;
    let bound = 2 * requests + seconds + 5;
    eprintln!("{requests} requests in {seconds} s or less: {writes} write calls (bound {bound})");
    assert!(
        writes <= bound,
        "{writes} write calls for {requests} requests"
    );
    assert!(
        writes >= 2 * requests,
        "{writes}: every request is written twice"
    );
    proxy.signal("TERM").await;
    let (status, _) = proxy.wait().await;
    assert!(status.success());
}
