//! Compatibility with the official OpenAI SDKs (Python and Node), driven as unmodified clients
//! against the real proxy and a mock upstream. `scripts/test` installs both SDKs under `target/`;
//! the tests fail, never skip, when an SDK is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::path::PathBuf;

use support::*;

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
