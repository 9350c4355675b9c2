//! Hostile clients over raw sockets: silent, idle and trickling connections, bodies over the
//! limit, compressed bodies and streamed uploads. Each test failed before its fix.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes the connection (or resets it); fails the test if it never does.
async fn closed_by_peer(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the proxy never closed the connection");
}

/// Reads one HTTP/1.1 response head and its content-length body from a raw socket.
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("no answer in time")
            .expect("the connection broke before the answer");
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_string();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while seen.len() < head_end + length {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed mid-body");
        seen.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&seen[head_end..head_end + length]).to_string();
    (status, head, body)
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_head_timeout() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nheader_read_timeout = \"300ms\"\n").await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    closed_by_peer(&mut silent).await;
    // A head that never ends is cut just the same.
    let mut partial = TcpStream::connect(proxy.addr).await.unwrap();
    partial
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed_by_peer(&mut partial).await;
    chat_ok(&proxy).await;
}

#[tokio::test]
async fn silent_idle_and_trickling_clients_cannot_keep_a_client_out() {
    let upstream = MockUpstream::openai_like().await;
    // A long head timeout: only giving up idle slots at the cap can let the client in.
    let config = "[server]\nmax_connections = 6\nheader_read_timeout = \"60s\"\nbody_read_timeout = \"60s\"\n";
    let proxy = TestProxy::start(&upstream, config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // Two kept-alive connections, idle after one answer each.
    for _ in 0..2 {
        let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
        idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, _, _) = read_response(&mut idle).await;
        assert_eq!(status, 200);
        held.push(idle);
    }
    // One request whose body trickles: it is in flight and keeps its slot.
    let mut trickle = TcpStream::connect(proxy.addr).await.unwrap();
    trickle
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    for _ in 0..10 {
        chat_ok(&proxy).await;
    }
    drop(held);
}

#[tokio::test]
async fn a_trickled_body_gets_408() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nbody_read_timeout = \"500ms\"\n").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"body_timeout\"") {
        let n = tokio::time::timeout(PATIENCE, read.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the 408: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    trickle.abort();
    assert_eq!(upstream.request_count(), 0);
}

/// Sends a `len`-byte JSON body in full while reading the answer; returns the status and whether
/// every byte could be written.
async fn send_oversized(proxy: &TestProxy, len: usize) -> (u16, String, bool) {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            write.write_all(&chunk[..n]).await?;
            left -= n;
        }
        Ok::<_, std::io::Error>(write)
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(PATIENCE, read.read(&mut buf))
            .await
            .unwrap()
        {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(error) => panic!(
                "reading the answer failed: {error}; read {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
        if String::from_utf8_lossy(&answer).contains("}}") {
            break;
        }
    }
    let wrote = writer.await.unwrap().is_ok();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text, wrote)
}

#[tokio::test]
async fn every_client_reads_the_413_of_a_body_over_the_limit() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nmax_body_bytes = 1048576\n").await;
    for _ in 0..10 {
        let (status, text, wrote) = send_oversized(&proxy, 5_000_000).await;
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("body_too_large"), "{text}");
        assert!(
            wrote,
            "the client could not finish sending: the proxy reset the connection"
        );
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn lingering_is_bounded_in_bytes() {
    let upstream = MockUpstream::openai_like().await;
    let config = "[server]\nmax_body_bytes = 1024\nlingering_bytes = 65536\n";
    let proxy = TestProxy::start(&upstream, config).await;
    // The client still reads its answer; past the bound the proxy stops reading and closes.
    let (status, text, _) = send_oversized(&proxy, 50_000_000).await;
    assert_eq!(status, 413, "{text}");
}

#[tokio::test]
async fn admin_connections_are_capped_and_timed_out() {
    let upstream = MockUpstream::openai_like().await;
    let config = "[server]\nheader_read_timeout = \"300ms\"\nadmin_max_connections = 4\n";
    let proxy = TestProxy::start(&upstream, config).await;
    let mut silent = TcpStream::connect(proxy.admin).await.unwrap();
    closed_by_peer(&mut silent).await;
    // Far more silent admin connections than the cap: probes and the API keep answering.
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(TcpStream::connect(proxy.admin).await.unwrap());
    }
    let (status, _, _) = read_all(send("GET", &proxy.admin_url("/healthz"), &[], "").await).await;
    assert_eq!(status, 200);
    chat_ok(&proxy).await;
    for mut stream in held {
        closed_by_peer(&mut stream).await;
    }
}

/// The real binary with an open-file limit of 256: admin connections must not take the file
/// descriptors the API needs.
#[tokio::test]
async fn admin_connections_cannot_starve_the_api_of_descriptors() {
    let upstream = MockUpstream::openai_like().await;
    let config = proxy_config_file(&upstream.url(), "[server]\nheader_read_timeout = \"60s\"\n");
    let proxy = BinaryProxy::spawn_with(
        &["prlimit", "--nofile=256:256", "--"],
        &config,
        &["--no-watch"],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(TcpStream::connect(&proxy.admin).await.unwrap());
    }
    for _ in 0..5 {
        let (status, _, body) = post_json(
            &format!("http://{}/v1/chat/completions", proxy.api),
            r#"{"model":"m","messages":[]}"#,
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body:?}");
    }
    drop(held);
    proxy.signal("TERM").await;
    let (status, _) = proxy.wait().await;
    assert!(status.success());
}

#[tokio::test]
async fn compressed_request_bodies_are_decoded() {
    let upstream = MockUpstream::openai_like().await;
    let routes = "[[routes]]\nname = \"fast\"\nmatch = { model = \"fast\" }\nmodel = \"openai/gpt-4o-mini\"\n";
    let proxy = TestProxy::start(&upstream, routes).await;
    let body = br#"{"model":"fast","messages":[{"role":"user","content":"compressed"}]}"#;
    let mut brotli = Vec::new();
    {
        let mut writer = brotli::CompressorWriter::new(&mut brotli, 4096, 5, 22);
        writer.write_all(body).unwrap();
    }
    let mut deflate = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    deflate.write_all(body).unwrap();
    let zstd =
        ruzstd::encoding::compress_to_vec(&body[..], ruzstd::encoding::CompressionLevel::Fastest);
    let encoded = [
        ("gzip", gzip(body)),
        ("deflate", deflate.finish().unwrap()),
        ("br", brotli),
        ("zstd", zstd),
    ];
    for (i, (encoding, bytes)) in encoded.into_iter().enumerate() {
        let response = send(
            "POST",
            &proxy.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("content-encoding", encoding),
            ],
            bytes,
        )
        .await;
        let (status, headers, answer) = read_all(response).await;
        assert_eq!(status, 200, "{encoding}: {answer:?}");
        assert_eq!(headers["x-proxy-model"], "openai/gpt-4o-mini");
        let seen = &upstream.requests()[i];
        assert_eq!(seen.json()["model"], "openai/gpt-4o-mini", "{encoding}");
        assert_eq!(seen.json()["messages"][0]["content"], "compressed");
        assert!(seen.header("content-encoding").is_none(), "{encoding}");
    }
}

#[tokio::test]
async fn a_decompression_bomb_is_413_and_an_unknown_encoding_415() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nmax_body_bytes = 1048576\n").await;
    let mut bomb = br#"{"model":"m","messages":[],"pad":""#.to_vec();
    bomb.extend(std::iter::repeat_n(b'a', 50_000_000));
    bomb.extend_from_slice(b"\"}");
    let bomb = gzip(&bomb);
    assert!(bomb.len() < 1_048_576);
    let json = ("content-type", "application/json");
    let response = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[json, ("content-encoding", "gzip")],
        bomb,
    )
    .await;
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 413);
    assert_eq!(error_json(&body)["error"]["code"], "body_too_large");

    let response = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[json, ("content-encoding", "compress")],
        "x",
    )
    .await;
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 415);
    let error = error_json(&body);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"compress\""),
        "{error}"
    );

    let response = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[json, ("content-encoding", "gzip")],
        "not gzip",
    )
    .await;
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 400);
    assert_eq!(
        error_json(&body)["error"]["code"],
        "invalid_content_encoding"
    );
    assert_eq!(upstream.request_count(), 0);
}

/// An upstream that tells the test when the first bytes of a request body reach it, and answers
/// with the number of body bytes it received.
async fn counting_upstream() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<()>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (first_bytes, arrived) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let first_bytes = first_bytes.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let first_bytes = first_bytes.clone();
                        async move {
                            let mut body = request.into_body();
                            let mut total = 0usize;
                            while let Some(frame) = body.frame().await {
                                let Ok(data) = frame.unwrap().into_data() else {
                                    continue;
                                };
                                if total == 0 && !data.is_empty() {
                                    let _ = first_bytes.send(()).await;
                                }
                                total += data.len();
                            }
                            let answer = format!("{{\"received\":{total}}}");
                            let mut response =
                                http::Response::new(http_body_util::Full::new(Bytes::from(answer)));
                            response
                                .headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (addr, arrived)
}

#[tokio::test]
async fn an_upload_reaches_the_upstream_before_the_client_finished_sending_it() {
    let (addr, mut arrived) = counting_upstream().await;
    let proxy = TestProxy::start_for(
        &format!("http://{addr}/api/v1"),
        "[server]\nmax_body_bytes = 65536\n",
    )
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let request = http::Request::post(proxy.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<ReceiverStream>>();
    let answer = tokio::spawn(client.request(request));
    tx.send(Ok(http_body::Frame::data(Bytes::from(vec![b'a'; 600_000]))))
        .await
        .unwrap();
    // The rest is sent only once the upstream has the first part: a proxy that buffered the
    // upload would wait here forever.
    tokio::time::timeout(PATIENCE, arrived.recv())
        .await
        .expect("the upload was buffered")
        .unwrap();
    tx.send(Ok(http_body::Frame::data(Bytes::from(vec![b'b'; 600_000]))))
        .await
        .unwrap();
    drop(tx);
    let response = tokio::time::timeout(PATIENCE, answer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(&body[..], br#"{"received":1200000}"#);
}

type ReceiverStream = ChannelStream<Result<http_body::Frame<Bytes>, std::io::Error>>;

/// A channel receiver as a stream of body frames.
struct ChannelStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ChannelStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> ChannelStream<T> {
    ChannelStream(rx)
}

fn form(boundary: &str, model: &str, file: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

#[tokio::test]
async fn a_forms_model_field_is_routed_and_rewritten_without_buffering_the_file() {
    let upstream = MockUpstream::start(|_| Reply::Json(200, r#"{"text":"hello"}"#.into())).await;
    let config = "[server]\nmax_body_bytes = 65536\n\
        [[routes]]\nname = \"speech\"\nmatch = { model = \"whisper\" }\nmodel = \"openai/whisper-1\"\n";
    let proxy = TestProxy::start(&upstream, config).await;
    let file: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let boundary = "----proxy-test-boundary";
    let body = form(boundary, "whisper", &file);
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let response = send(
        "POST",
        &proxy.url("/v1/audio/transcriptions"),
        &[("content-type", &content_type)],
        body.clone(),
    )
    .await;
    let (status, headers, answer) = read_all(response).await;
    assert_eq!(status, 200, "{answer:?}");
    assert_eq!(headers["x-proxy-model"], "openai/whisper-1");
    let seen = &upstream.requests()[0];
    assert_eq!(
        &seen.body[..],
        &form(boundary, "openai/whisper-1", &file)[..]
    );
    assert_eq!(
        seen.header("content-length").unwrap(),
        seen.body.len().to_string()
    );
    assert!(seen.header("authorization").unwrap().ends_with(TEST_KEY));
}

#[tokio::test]
async fn an_upload_over_max_upload_bytes_is_413() {
    let upstream = MockUpstream::start(|_| Reply::Json(200, "{}".into())).await;
    let proxy = TestProxy::start(&upstream, "[server]\nmax_upload_bytes = 100000\n").await;
    let octets = ("content-type", "application/octet-stream");
    // Declared too large: refused before anything goes upstream, and the client reads the 413.
    let response = send(
        "POST",
        &proxy.url("/v1/files"),
        &[octets],
        vec![0u8; 300_000],
    )
    .await;
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 413);
    assert_eq!(error_json(&body)["error"]["code"], "body_too_large");
    assert_eq!(upstream.request_count(), 0);
    // Sent without a length: cut once it passes the limit.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = http::Request::post(proxy.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(http_body_util::StreamBody::new(ChannelStream(rx)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<ReceiverStream>>();
    let answer = tokio::spawn(client.request(request));
    for _ in 0..4 {
        if tx
            .send(Ok(http_body::Frame::data(Bytes::from(vec![1u8; 40_000]))))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let response = tokio::time::timeout(PATIENCE, answer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, 413, "{body:?}");
    assert_eq!(error_json(&body)["error"]["code"], "body_too_large");
}

#[tokio::test]
async fn the_head_deadline_spares_connections_that_sent_a_request() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nheader_read_timeout = \"300ms\"\n").await;
    // An answer slower than the head deadline, on the connection's first request.
    upstream.push(Reply::After(
        Duration::from_millis(900),
        Box::new(Reply::Json(200, chat_completion("m", "slow"))),
    ));
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\r\n{\"model\":\"m\",\"messages\":[]}";
    stream.write_all(request).await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
    // Kept alive well past the deadline, with requests coming faster than the idle timeout.
    for _ in 0..8 {
        stream.write_all(request).await.unwrap();
        let (status, _, body) = read_response(&mut stream).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
