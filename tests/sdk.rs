//! Compatibility with the official OpenAI SDKs (Python and Node), driven as unmodified clients
//! against the real proxy and a mock upstream. `scripts/test` installs both SDKs under `target/`;
//! the tests fail, never skip, when an SDK is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::PathBuf;

use common::*;

const ROUTES: &str = r#"
[server]
max_body_bytes = 10000

[[routes]]
name = "fast"
match = { model = "fast" }
model = "openai/gpt-4o-mini"
"#;

fn node_modules() -> PathBuf {
    let path = std::env::var_os("OPENAI_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/sdk-node/node_modules"));
    assert!(
        path.join("openai").exists(),
        "no openai Node package under {}: run scripts/test (or set OPENAI_NODE_MODULES)",
        path.display()
    );
    path
}

#[tokio::test]
async fn official_python_sdk() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/openai_python.py"));
    run_client(command, &proxy).await;

    let sent = upstream.requests();
    assert_eq!(
        sent.len(),
        6,
        "chat, stream, raw chat, completion, embedding, models"
    );
    for request in &sent {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {TEST_KEY}").as_str())
        );
    }
    assert_eq!(sent[1].json()["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn official_node_sdk_streaming() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, ROUTES).await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(root().join("tests/sdk/openai_node.cjs"))
        .env("OPENAI_NODE_MODULES", node_modules());
    run_client(command, &proxy).await;
    assert_eq!(upstream.requests()[0].json()["model"], "openai/gpt-4o-mini");
}

#[tokio::test]
async fn python_sdk_raises_on_a_stream_broken_midway() {
    let upstream = MockUpstream::start(|_| {
        // Content, then the connection is cut before `[DONE]`.
        Reply::Sse(vec![chunk_event("m", "partial")])
    })
    .await;
    let proxy = TestProxy::start(
        &upstream,
        "[[routes]]\nname = \"breaks\"\nmatch = { model = \"breaks\" }\nmodel = \"m\"\n",
    )
    .await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/midstream_python.py"));
    run_client(command, &proxy).await;
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn python_sdk_reads_a_replayed_stream_like_the_original() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(
        &upstream,
        "[[routes]]\nname = \"cached\"\nmatch = { model = \"cached\" }\nmodel = \"m\"\ncache_ttl = \"10m\"\n",
    )
    .await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/cache_replay_python.py"));
    run_client(command, &proxy).await;
    assert_eq!(
        upstream.request_count(),
        1,
        "the replay made no upstream call"
    );
}

#[tokio::test]
async fn python_sdk_uploads_stream_through_sync_and_async() {
    let upstream = MockUpstream::start(|request| {
        let path = request.path_and_query.as_str();
        if path == "/api/v1/files" {
            let file = serde_json::json!({
                "id": "file-1", "object": "file", "bytes": 11 * 1024 * 1024, "created_at": 1,
                "filename": "big.jsonl", "purpose": "batch", "status": "processed"
            });
            Reply::Json(200, file.to_string())
        } else {
            Reply::Json(200, r#"{"text":"hello from the mock"}"#.into())
        }
    })
    .await;
    let config = "[server]\nmax_body_bytes = 1048576\n\
        [[routes]]\nname = \"speech\"\nmatch = { model = \"whisper\" }\nmodel = \"openai/whisper-1\"\n";
    let proxy = TestProxy::start(&upstream, config).await;
    let mut command = tokio::process::Command::new(python());
    command.arg(root().join("tests/sdk/uploads_python.py"));
    run_client(command, &proxy).await;
    let sent = upstream.requests();
    assert_eq!(sent.len(), 3, "file, transcription, file (async)");
    for file in [&sent[0], &sent[2]] {
        assert!(file.body.len() > 11 * 1024 * 1024, "{}", file.body.len());
        let needle = b"name=\"purpose\"\r\n\r\nbatch";
        assert!(file.body.windows(needle.len()).any(|w| w == needle));
    }
    let needle = b"name=\"model\"\r\n\r\nopenai/whisper-1\r\n";
    assert!(sent[1].body.windows(needle.len()).any(|w| w == needle));
}

#[tokio::test]
async fn node_sdk_reads_the_413_of_every_oversized_body() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nmax_body_bytes = 1048576\n").await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(root().join("tests/sdk/body_limit_node.cjs"))
        .env("OPENAI_NODE_MODULES", node_modules());
    run_client(command, &proxy).await;
    assert_eq!(upstream.request_count(), 0);
}
