//! Plain-HTTP upstream connections as an upstream sees them: they are reused between requests, a
//! connection the upstream closed while idle costs no request, a connection that cannot be
//! reused is not, and a client that leaves or `pool_idle_timeout` closes the connection.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{chat_completion, chat_ok, client, wait_until, TestProxy};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream does on each connection.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers every request on the connection, until the proxy closes it.
    KeepAlive,
    /// Answers one request (a keep-alive answer), then closes without a word.
    CloseSilently,
    /// Answers one request with `Connection: close`, then closes.
    ConnectionClose,
    /// Starts an event stream and keeps it open until the proxy closes the connection.
    Stream,
}

/// A hand-written HTTP/1.1 upstream on loopback that counts connections, requests and closes.
struct RawUpstream {
    url: String,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Connections that ended, whichever side closed them.
    closed: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    async fn start(mode: Mode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/v1", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let counters = (accepted.clone(), requests.clone(), closed.clone());
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                counters.0.fetch_add(1, Ordering::SeqCst);
                let (requests, closed) = (counters.1.clone(), counters.2.clone());
                connections.spawn(async move {
                    serve(socket, mode, &requests).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream {
            url,
            accepted,
            requests,
            closed,
            server,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Serves one connection; returns once it is closed (by either side).
async fn serve(mut socket: TcpStream, mode: Mode, requests: &AtomicUsize) {
    let mut buffer = Vec::new();
    while read_request(&mut socket, &mut buffer).await {
        requests.fetch_add(1, Ordering::SeqCst);
        let body = chat_completion("m", "hello");
        let head = match mode {
            Mode::ConnectionClose => "HTTP/1.1 200 OK\r\nconnection: close\r\n",
            Mode::Stream => {
                let event = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
                let start = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                     transfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
                    event.len()
                );
                socket.write_all(start.as_bytes()).await.unwrap();
                // Held open: the next read ends when the proxy closes the connection.
                let _ = socket.read(&mut [0u8; 64]).await;
                return;
            }
            Mode::KeepAlive | Mode::CloseSilently => "HTTP/1.1 200 OK\r\n",
        };
        let answer = format!(
            "{head}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if socket.write_all(answer.as_bytes()).await.is_err() || mode != Mode::KeepAlive {
            return;
        }
    }
}

/// Reads one request (head and `content-length` body) into `buffer`; false at the end of the
/// connection.
async fn read_request(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if buffer.len() >= end + 4 + length {
                buffer.drain(..end + 4 + length);
                return true;
            }
        }
        let mut chunk = [0u8; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An upstream in `mode` and the proxy in front of it, with `extra` config.
async fn proxied(mode: Mode, extra: &str) -> (RawUpstream, TestProxy) {
    let upstream = RawUpstream::start(mode).await;
    let proxy = TestProxy::start_for(&upstream.url, extra).await;
    (upstream, proxy)
}

/// A chat request answered by the upstream (its answer says "hello").
async fn chat(proxy: &TestProxy) {
    let body = chat_ok(proxy).await;
    assert!(String::from_utf8_lossy(&body).contains("hello"));
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let (upstream, proxy) = proxied(Mode::KeepAlive, "").await;
    for _ in 0..10 {
        chat(&proxy).await;
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 10);
    assert_eq!(
        upstream.accepted(),
        1,
        "every request reused the connection"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_costs_no_request() {
    let (upstream, proxy) = proxied(Mode::CloseSilently, "").await;
    for done in 1..=5 {
        chat(&proxy).await;
        // The upstream has closed the connection the proxy keeps before the next request.
        wait_until("the upstream to close its connection", || {
            upstream.closed() == done
        })
        .await;
    }
    assert_eq!(upstream.accepted(), 5);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 5);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_answer_with_connection_close_is_not_followed_on_its_connection() {
    let (upstream, proxy) = proxied(Mode::ConnectionClose, "").await;
    for _ in 0..4 {
        chat(&proxy).await;
    }
    assert_eq!(upstream.accepted(), 4);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_leaving_a_stream_closes_its_upstream_connection() {
    let (upstream, proxy) = proxied(Mode::Stream, "").await;
    let request = http::Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("\"a\""));
    drop(body);
    wait_until("the upstream connection to close", || {
        upstream.closed() == 1
    })
    .await;
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_pool_idle_timeout() {
    let (upstream, proxy) =
        proxied(Mode::KeepAlive, "[upstream]\npool_idle_timeout = \"200ms\"").await;
    chat(&proxy).await;
    wait_until("the idle connection to close", || upstream.closed() == 1).await;
    // The next request opens a new connection and is answered.
    chat(&proxy).await;
    assert_eq!(upstream.accepted(), 2);
    proxy.stop().await.unwrap();
}
