//! Small helpers over what the mock received, and request bodies the tests build.

use std::io::Write;

use super::MockUpstream;

/// The `model` of every request the mock received, in order (empty for a body without one).
pub fn models_sent(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.json()["model"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// `bytes`, gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The value of one exact series (name and labels as written) in Prometheus text, 0 when it is
/// absent (a counter not yet incremented).
pub fn series_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// One client connection of its own to `addr` (not pooled), and its task, which ends when the
/// connection closes.
pub async fn own_connection(
    addr: &str,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

/// A chat completion request for model `m` to the proxy at `addr`, streamed or not.
pub fn chat_post(addr: &str, stream: bool) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let body = format!(
        r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

/// A chat stream through the proxy at `addr` on a client connection of its own, read up to its
/// first event, which the test sends through `events` (content "before"): the request sender,
/// the connection's task and the rest of the body.
pub async fn open_stream(
    addr: &str,
    events: &tokio::sync::mpsc::Sender<super::Step>,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
    hyper::body::Incoming,
) {
    let (mut sender, connection) = own_connection(addr).await;
    let response =
        tokio::time::timeout(super::PATIENCE, sender.send_request(chat_post(addr, true)))
            .await
            .expect("no answer in time")
            .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let mut body = response.into_body();
    let first = super::chunk_event("m", "before");
    events.send(super::data(&first)).await.unwrap();
    super::read_until(&mut body, "before").await;
    (sender, connection, body)
}
