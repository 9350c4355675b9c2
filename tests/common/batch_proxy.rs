//! Support for the tests of the Batch API inside the proxy: configs with tokens and a rewriting
//! route, a mock whose answers name their line, the Python SDK's batch client run against a
//! proxy, and counting what the mock received per line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use super::{
    chat_completion, proxy_config_file, python, root, MockUpstream, Recorded, Reply, PATIENCE,
};

/// The inbound tokens of the callers `alice` and `bob` in [`binary_config`].
pub const ALICE: &str = "alice-secret-token";
pub const BOB: &str = "bob-secret-token";

/// The model the lines ask for, and what the route rewrites it to.
pub const ROUTE: &str =
    "[[routes]]\nname = \"batchy\"\nmatch = { model = \"m\" }\nmodel = \"vendor/rewritten\"\n";

/// A `[[server.tokens]]` entry named `name` for the token `secret`.
pub fn token(name: &str, secret: &str) -> String {
    let digest = openrouter_proxy::auth::hex(&openrouter_proxy::auth::sha256(secret.as_bytes()));
    format!("[[server.tokens]]\nname = \"{name}\"\nsha256 = \"{digest}\"\n")
}

/// A config file for the binary: tokens for alice and bob, the upstream at `upstream`, the Batch
/// API on `store` (with `batch` appended to its table), and the rewriting route.
pub fn binary_config(upstream: &MockUpstream, store: &Path, batch: &str) -> PathBuf {
    let extra = format!(
        "[server]\ndrain_delay = \"0s\"\n{}{}\
         [batch]\nstore = \"{}\"\nretry_base = \"20ms\"\n{batch}\n{ROUTE}",
        token("alice", ALICE),
        token("bob", BOB),
        store.display(),
    );
    proxy_config_file(&upstream.url(), &extra)
}

/// The number N of a `numbered_lines` request (its message is "question N").
pub fn line_of(request: &Recorded) -> usize {
    let body = request.json();
    let content = body["messages"][0]["content"].as_str().unwrap();
    content.strip_prefix("question ").unwrap().parse().unwrap()
}

/// The mock's answer to line N, naming the model it was sent.
pub fn answer(request: &Recorded) -> Reply {
    let model = request.json()["model"].as_str().unwrap().to_owned();
    let text = format!("answer to line-{}", line_of(request));
    Reply::Json(200, chat_completion(&model, &text))
}

/// How many requests the mock received for each line.
pub fn sent_per_line(upstream: &MockUpstream) -> HashMap<usize, usize> {
    let mut sent = HashMap::new();
    for request in upstream.requests() {
        *sent.entry(line_of(&request)).or_default() += 1;
    }
    sent
}

/// Uploads `lines` numbered chat lines and creates their batch through the Python SDK, as the
/// caller with `key` at `addr`; returns the batch's id.
pub async fn sdk_create_batch(addr: &str, key: &str, lines: usize) -> String {
    let input = super::batch::input_file(&super::batch::numbered_lines("line", lines));
    let created = python_sdk(addr, key, &["create", input.to_str().unwrap()]).await;
    created["batch_id"].as_str().unwrap().to_owned()
}

/// Runs `tests/sdk/batch_python.py` with `args` against the proxy at `addr` as the caller with
/// `key`, and returns the JSON it printed.
pub async fn python_sdk(addr: &str, key: &str, args: &[&str]) -> Value {
    let mut client = tokio::process::Command::new(python());
    client
        .arg(root().join("tests/sdk/batch_python.py"))
        .args(args)
        .env("OPENAI_BASE_URL", format!("http://{addr}/v1"))
        .env("OPENAI_API_KEY", key);
    super::client_json(client, PATIENCE * 6).await
}

pub fn counts(batch: &Value) -> (u64, u64, u64) {
    let c = &batch["request_counts"];
    let n = |key: &str| c[key].as_u64().unwrap();
    (n("total"), n("completed"), n("failed"))
}

/// A mock that rate limits line 7 twice, answers line 9 with a 400, and answers the rest.
pub async fn upstream_with_bad_lines() -> MockUpstream {
    let seen = Mutex::new(HashMap::<usize, u32>::new());
    MockUpstream::start(move |request| {
        let n = line_of(request);
        let times = {
            let mut asked = seen.lock().unwrap();
            let times = asked.entry(n).or_default();
            *times += 1;
            *times
        };
        match n {
            7 if times <= 2 => Reply::Json(429, error_body("slow down", "rate_limit_exceeded")),
            9 => Reply::Json(400, error_body("bad line", "invalid_request_error")),
            _ => answer(request),
        }
    })
    .await
}

pub fn error_body(message: &str, kind: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": kind, "code": null}}).to_string()
}

pub fn sent_paths(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

/// Polls `condition` until it holds; fails the test after [`PATIENCE`].
pub async fn wait_until_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: never");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
