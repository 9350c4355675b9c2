//! Which HTTP a client connection speaks, told by peeking at its first bytes (HTTP/2's connection
//! preface for h2c with prior knowledge, anything else HTTP/1.1) without consuming them: hyper
//! then reads the request from the socket itself, into one buffer of its initial size, where a
//! version sniffer that consumed the bytes and handed them back made it grow to twice that for
//! every connection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Body;
use hyper::body::Incoming;
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection served by hyper.
pub(crate) type Connection<S> = Served<
    http1::Connection<TokioIo<TcpStream>, S>,
    http2::Connection<TokioIo<TcpStream>, S, TokioExecutor>,
>;

/// The proxy's HTTP/1.1 and HTTP/2 settings for a listener.
#[derive(Clone)]
pub(crate) struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub(crate) fn new(
        header_read_timeout: Duration,
        max_header_bytes: usize,
        max_headers: usize,
        h2_streams: u32,
    ) -> Builders {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // Also closes keep-alive connections that stay idle this long before their next
            // request.
            .header_read_timeout(header_read_timeout)
            .max_buf_size(max_header_bytes)
            .max_headers(max_headers)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2_streams)
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
            // Pings find dead peers of long streams; an unanswered ping closes the connection.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        Builders { http1, http2 }
    }

    /// Serves `stream` with `service` in HTTP/2 (`h2`) or HTTP/1.1.
    pub(crate) fn serve<S, B>(&self, h2: bool, stream: TcpStream, service: S) -> Connection<S>
    where
        S: HttpService<Incoming, ResBody = B>,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        TokioExecutor: Http2ServerConnExec<S::Future, B>,
    {
        let io = TokioIo::new(stream);
        if h2 {
            Served::Http2(Box::pin(self.http2.serve_connection(io, service)))
        } else {
            Served::Http1(Box::pin(self.http1.serve_connection(io, service)))
        }
    }
}

/// Whether the client opened with HTTP/2's preface. Nothing is consumed. A connection that
/// closes first is HTTP/1.1 (hyper then sees the end). Without a stream, never resolves.
pub(crate) async fn is_h2(stream: Option<&TcpStream>) -> std::io::Result<bool> {
    let Some(stream) = stream else {
        return std::future::pending().await;
    };
    let mut seen = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut seen).await?;
        if n == 0 || seen[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Only part of the preface so far; peeking again at once would see the same bytes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A connection served in the HTTP it speaks.
pub(crate) enum Served<A, B> {
    Http1(Pin<Box<A>>),
    Http2(Pin<Box<B>>),
}

impl<A: GracefulConnection, B: GracefulConnection> Served<A, B> {
    /// Ends the connection after the requests in flight (HTTP/2: a GOAWAY).
    pub(crate) fn graceful_shutdown(&mut self) {
        match self {
            Served::Http1(connection) => connection.as_mut().graceful_shutdown(),
            Served::Http2(connection) => connection.as_mut().graceful_shutdown(),
        }
    }
}

impl<A, B, T> Future for Served<A, B>
where
    A: Future<Output = T>,
    B: Future<Output = T>,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            Served::Http1(connection) => connection.as_mut().poll(cx),
            Served::Http2(connection) => connection.as_mut().poll(cx),
        }
    }
}

/// Serves `connection` until it ends; without one (the version not told yet), never resolves.
pub(crate) async fn drive<A, B, T>(connection: &mut Option<Served<A, B>>) -> T
where
    A: Future<Output = T>,
    B: Future<Output = T>,
{
    match connection {
        Some(connection) => connection.await,
        None => std::future::pending().await,
    }
}
