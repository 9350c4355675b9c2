//! Upstream answers the proxy must relay and record faithfully: a JSON answer finished with an
//! error, one enormous SSE line, a compressed answer, and an empty 200 whose client leaves right
//! after reading the head.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use support::*;

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

