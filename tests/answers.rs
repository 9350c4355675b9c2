//! Upstream answers the proxy must relay and record faithfully: a JSON answer finished with an
//! error, one enormous SSE line, a compressed answer, and an empty 200 whose client leaves right
//! after reading the head.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use common::*;

const ROUTES: &str = r#"
[fallback]
cooldown = "0s"

[[routes]]
name = "answers-chain"
match = { model = "chain" }
model = "primary/model"
fallbacks = ["backup/model"]

[[routes]]
name = "answers-cached"
match = { model = "cached" }
model = "primary/model"
cache_ttl = "10m"

[[routes]]
name = "answers-deletes"
match = { path = "/v1/responses/*" }
"#;

fn finished_with_error(model: &str) -> String {
    serde_json::json!({
        "id": "gen-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                     "finish_reason": "error"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    })
    .to_string()
}

#[tokio::test]
async fn a_json_answer_finished_with_an_error_falls_back_and_is_never_cached() {
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Json(200, finished_with_error("primary/model")));
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let chat = r#"{"model":"chain","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, headers, body) = post_json(&proxy.url("/v1/chat/completions"), chat, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "backup/model", "{body:?}");
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock"
    );

    // With no fallback left the client gets the answer, but it is not stored for a repeat.
    let upstream =
        MockUpstream::start(|_| Reply::Json(200, finished_with_error("primary/model"))).await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let cached = r#"{"model":"cached","messages":[{"role":"user","content":"hi"}]}"#;
    for round in 0..2 {
        let (status, headers, body) =
            post_json(&proxy.url("/v1/chat/completions"), cached, &[]).await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(headers["x-cache"], "MISS", "round {round}");
    }
    assert_eq!(upstream.request_count(), 2);
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[tokio::test]
async fn compressed_answers_reach_the_client_untouched() {
    let events = [
        chunk_event("primary/model", "Hello"),
        chunk_event("primary/model", " there"),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let stream = Bytes::from(gzip(events.as_bytes()));
    let json = Bytes::from(gzip(
        chat_completion("primary/model", "compressed").as_bytes(),
    ));
    let (sent_stream, sent_json) = (stream.clone(), json.clone());
    let upstream = MockUpstream::start(move |request| {
        let (content_type, body) = if request.json()["stream"] == true {
            ("text/event-stream", sent_stream.clone())
        } else {
            ("application/json", sent_json.clone())
        };
        let headers = vec![("content-type", content_type), ("content-encoding", "gzip")];
        Reply::Raw(200, headers, body)
    })
    .await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;

    // A pass-through stream, and one on a chain (inspected before content).
    for model in ["m", "chain"] {
        let body = format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#);
        let (status, headers, received) = read_all(chat_request(&proxy, &body).await).await;
        assert_eq!(status, 200, "{model}");
        assert_eq!(headers["content-encoding"], "gzip", "{model}");
        assert_eq!(received, stream, "{model}: the gzip bytes, nothing added");
        assert_eq!(gunzip(&received), events, "{model}");
    }
    // A JSON answer on a cached chain: relayed as it came, twice, never replayed without its
    // encoding.
    let body = r#"{"model":"cached","messages":[]}"#;
    for round in 0..2 {
        let (status, headers, received) =
            post_json(&proxy.url("/v1/chat/completions"), body, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-encoding"], "gzip", "round {round}");
        assert_eq!(received, json, "round {round}");
    }
    let sent = upstream.requests();
    assert_eq!(sent.len(), 4);
    for request in sent {
        assert_eq!(request.header("accept-encoding"), Some("identity"));
    }
}

/// Sends a request head on a raw connection, reads up to the end of the answer's head, and
/// closes the connection.
async fn read_head_and_leave(proxy: &TestProxy, method: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nhost: proxy\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("no answer in time")
            .unwrap();
        assert!(read > 0, "closed before the head");
        head.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn an_empty_200_is_recorded_with_its_status_when_the_client_leaves_after_the_head() {
    let upstream = MockUpstream::start(|request| {
        if request.path_and_query.ends_with("/chunked") {
            Reply::Raw(200, vec![], Bytes::new())
        } else {
            Reply::Raw(200, vec![("content-length", "0")], Bytes::new())
        }
    })
    .await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    for path in ["/v1/responses/resp_1", "/v1/responses/resp_2/chunked"] {
        let head = read_head_and_leave(&proxy, "DELETE", path).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let series = |status: u16| {
        format!(
            r#"openrouter_requests_total{{route="answers-deletes",model="",status="{status}"}}"#
        )
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (ok, closed) = loop {
        let ok = proxy.metric(&series(200)).await.unwrap_or(0.0);
        let closed = proxy.metric(&series(499)).await.unwrap_or(0.0);
        if ok + closed >= 2.0 || tokio::time::Instant::now() > deadline {
            break (ok, closed);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        (ok, closed),
        (2.0, 0.0),
        "200s recorded, client_closed recorded"
    );
}

const LINE: usize = 64 << 20;
const PIECE: usize = 64 << 10;
/// Far above what the proxy should hold for one stream, far below the line.
const MAX_GROWTH: u64 = 24 << 20;

/// Streams one 64 MiB SSE line through the proxy while the client reads it, and returns the
/// growth of this process's resident memory once the client has received the whole line but
/// before the line ends (an unbounded scanner would hold all of it then).
async fn stream_one_huge_line(model: &str, content_first: bool) -> u64 {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let first = if content_first {
        chunk_event("m", "first")
    } else {
        String::new()
    };
    let open = r#"data: {"choices":[{"index":0,"delta":{"content":""#;
    let close = "\"}}]}\n\ndata: [DONE]\n\n";
    let before_close = (first.len() + open.len() + LINE) as u64;

    let (progress, mut received) = watch::channel(0u64);
    let body = format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#);
    let url = proxy.url("/v1/chat/completions");
    let reader = tokio::spawn(async move {
        let headers = [("content-type", "application/json")];
        let response = send("POST", &url, &headers, body).await;
        let mut body = response.into_body();
        let (mut total, mut tail) = (0u64, Vec::new());
        while let Some(data) = next_data(&mut body).await {
            total += data.len() as u64;
            tail.extend_from_slice(&data);
            let keep = tail.len().saturating_sub(256);
            tail.drain(..keep);
            progress.send_replace(total);
        }
        (total, String::from_utf8_lossy(&tail).into_owned())
    });

    let baseline = rss_bytes();
    if content_first {
        tx.send(data(&first)).await.unwrap();
    }
    tx.send(data(open)).await.unwrap();
    let piece = Bytes::from(vec![b'x'; PIECE]);
    for _ in 0..LINE / PIECE {
        tx.send(Step::Data(piece.clone())).await.unwrap();
    }
    tokio::time::timeout(PATIENCE * 3, received.wait_for(|n| *n >= before_close))
        .await
        .expect("the client did not receive the line while it was still open")
        .unwrap();
    let growth = rss_bytes().saturating_sub(baseline);
    tx.send(data(close)).await.unwrap();
    drop(tx);
    let (total, tail) = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(total, before_close + close.len() as u64, "{model}: {tail}");
    assert!(tail.ends_with(close), "{model}: nothing appended: {tail}");
    growth
}

#[tokio::test]
async fn one_enormous_sse_line_passes_through_in_bounded_memory() {
    // After content on a pass-through route (the scanner's window), and before content on a
    // chain (the preamble held back).
    for (model, content_first) in [("m", true), ("chain", false)] {
        let growth = stream_one_huge_line(model, content_first).await;
        println!(
            "{model}: RSS grew by {} KiB for one {} MiB line",
            growth >> 10,
            LINE >> 20
        );
        assert!(
            growth < MAX_GROWTH,
            "{model}: resident memory grew by {} MiB for one {} MiB line",
            growth >> 20,
            LINE >> 20
        );
    }
}
