//! Replicas sharing one Redis: the real binary started twice on one `redis-server`, requests to
//! either, its `/metrics` polled until a condition holds, and the keys the replicas wrote.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::redis::RedisServer;
use super::{labelled, post_json, read_all, send, temp_file, BinaryProxy, PATIENCE, TEST_KEY};

/// A replica's config file: the mock upstream at `upstream`, `[redis]` on `server` with
/// `op_timeout`, the Redis cache tier, and `extra` (routes, tokens) after it.
pub fn replica_config(
    server: &RedisServer,
    upstream: &str,
    op_timeout: &str,
    extra: &str,
) -> PathBuf {
    let key_file = temp_file("api-key", &format!("{TEST_KEY}\n"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\
         [upstream]\nbase_url = \"{upstream}\"\napi_key_file = \"{}\"\n\
         [redis]\nurl = \"{}\"\nop_timeout = \"{op_timeout}\"\n\
         [cache]\ntier2 = \"redis\"\n\n{extra}\n",
        key_file.display(),
        server.url()
    );
    temp_file("proxy.toml", &text)
}

/// Starts the binary on `config` (reloaded on SIGHUP only) and waits until it uses Redis.
pub async fn start_replica(config: &std::path::Path) -> BinaryProxy {
    let proxy = BinaryProxy::spawn(config, &["--no-watch"]).await;
    wait_metric(&proxy, "redis up", |m| {
        gauge(m, "openrouter_redis_up") == Some(1.0)
    })
    .await;
    proxy
}

/// Two replicas A and B of the same config.
pub async fn start_pair(config: &std::path::Path) -> (BinaryProxy, BinaryProxy) {
    let a = start_replica(config).await;
    let b = start_replica(config).await;
    (a, b)
}

/// Ends a replica the way Kubernetes does (SIGTERM to its PID) and returns its log lines.
pub async fn stop(proxy: BinaryProxy) -> Vec<String> {
    proxy.signal("TERM").await;
    let (status, logs) = proxy.wait().await;
    assert!(status.success(), "the replica exited with {status}");
    logs
}

/// POSTs a chat request to a replica: status, headers and the whole body.
pub async fn chat(
    proxy: &BinaryProxy,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let url = format!("http://{}/v1/chat/completions", proxy.api);
    post_json(&url, body, headers).await
}

/// A chat body for `model` whose prompt is `prompt`.
pub fn chat_body(model: &str, prompt: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    })
    .to_string()
}

/// A response header as text.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The replica's `/metrics`.
pub async fn metrics_of(proxy: &BinaryProxy) -> String {
    let url = format!("http://{}/metrics", proxy.admin);
    let (status, _, body) = read_all(send("GET", &url, &[], "").await).await;
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// An unlabelled gauge or counter in a `/metrics` text.
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    labelled(text, name, &[])
}

/// The sum of `openrouter_redis_errors_total` over its `op`s.
pub fn redis_errors(text: &str) -> f64 {
    [
        "rate_limit",
        "budget_check",
        "budget_record",
        "cache_get",
        "cache_put",
    ]
    .iter()
    .filter_map(|op| labelled(text, "openrouter_redis_errors_total", &[("op", op)]))
    .sum()
}

/// Polls the replica's `/metrics` every 20 ms until `condition` holds; fails after a generous
/// deadline with the last text seen.
pub async fn wait_metric(proxy: &BinaryProxy, what: &str, condition: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = metrics_of(proxy).await;
        if condition(&text) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} on {}:\n{}",
            proxy.admin,
            text.lines()
                .filter(|l| l.contains("redis"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The keys of the cache tier in `server` (a connection of the test's own).
pub async fn cache_keys(server: &RedisServer) -> Vec<String> {
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("KEYS")
        .arg("orp:cache:*")
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Waits until the cache tier in `server` holds at least `n` answers (they are written off the
/// request path, shortly after the answer ended).
pub async fn wait_cached(server: &RedisServer, n: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while cache_keys(server).await.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} answers ever reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lowercase hex SHA-256 of `token`, as `server.tokens` holds it.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
