//! `[redis]` in the life of the real binary: its metrics are described from start-up, and a
//! reload that changes or removes `[redis]` applies without a restart and says so in the log.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::replicas::{
    chat, chat_body, gauge, header, metrics_of, redis_errors, replica_config, start_replica, stop,
    wait_metric,
};
use common::{labelled, MockUpstream, PATIENCE};

const STEADY: &str = "5s";
const CACHED_ROUTE: &str =
    "[[routes]]\nname = \"cached\"\nmatch = { model = \"cached\" }\nmodel = \"m\"\ncache_ttl = \"10m\"\n";

#[tokio::test]
async fn the_redis_metrics_are_described_and_start_at_zero() {
    let server = RedisServer::start().await;
    let upstream = MockUpstream::openai_like().await;
    let proxy = start_replica(&replica_config(&server, &upstream.url(), STEADY, "")).await;
    let metrics = metrics_of(&proxy).await;
    for family in [
        "openrouter_redis_up",
        "openrouter_redis_errors_total",
        "openrouter_cache_tier2_writes_dropped_total",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "no HELP for {family}"
        );
    }
    for op in [
        "rate_limit",
        "budget_check",
        "budget_record",
        "cache_get",
        "cache_put",
    ] {
        let value = labelled(&metrics, "openrouter_redis_errors_total", &[("op", op)]);
        assert_eq!(value, Some(0.0), "{op} before any error");
    }
    assert_eq!(
        gauge(&metrics, "openrouter_cache_tier2_writes_dropped_total"),
        Some(0.0)
    );
    stop(proxy).await;
}

/// The keys under `pattern` in `server`.
async fn keys(server: &RedisServer, pattern: &str) -> Vec<String> {
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut connection)
        .await
        .unwrap()
}

async fn wait_keys(server: &RedisServer, pattern: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while keys(server, pattern).await.len() < n {
        assert!(Instant::now() < deadline, "no {pattern} key in Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGHUP and waits until the proxy counted `n` successful reloads.
async fn reload(proxy: &common::BinaryProxy, n: f64) {
    proxy.signal("HUP").await;
    wait_metric(proxy, "the reload", |m| {
        labelled(m, "openrouter_config_reloads_total", &[("result", "ok")]) >= Some(n)
    })
    .await;
}

fn logged<'a>(logs: &'a [String], message: &str) -> Vec<&'a String> {
    logs.iter().filter(|line| line.contains(message)).collect()
}

#[tokio::test]
async fn a_reload_moves_to_new_redis_settings_and_drops_redis_without_a_restart() {
    let (one, mut two) = (RedisServer::start().await, RedisServer::start().await);
    let upstream = MockUpstream::openai_like().await;
    let path = replica_config(&one, &upstream.url(), STEADY, CACHED_ROUTE);
    let proxy = start_replica(&path).await;
    let (_, headers, _) = chat(&proxy, &chat_body("cached", "before", false), &[]).await;
    assert_eq!(header(&headers, "x-cache"), Some("MISS"));
    wait_keys(&one, "orp:cache:*", 1).await;

    // Another server and prefix: new connections, no restart.
    let text = std::fs::read_to_string(&path).unwrap();
    let moved = text.replace(
        &format!("url = \"{}\"", one.url()),
        &format!("url = \"{}\"\nkey_prefix = \"two:\"", two.url()),
    );
    assert_ne!(moved, text);
    std::fs::write(&path, &moved).unwrap();
    reload(&proxy, 1.0).await;
    wait_metric(&proxy, "the new Redis up", |m| {
        gauge(m, "openrouter_redis_up") == Some(1.0)
    })
    .await;
    let (_, headers, _) = chat(&proxy, &chat_body("cached", "after the move", false), &[]).await;
    assert_eq!(header(&headers, "x-cache"), Some("MISS"));
    wait_keys(&two, "two:cache:*", 1).await;
    assert_eq!(
        keys(&one, "*").await.len(),
        1,
        "the old Redis is left alone"
    );

    // Without [redis]: no Redis call at all, even with the old server gone.
    let without: String = moved
        .lines()
        .filter(|l| {
            !l.starts_with("url =") && !l.starts_with("op_timeout") && !l.starts_with("key_prefix")
        })
        .filter(|l| *l != "[redis]" && !l.starts_with("tier2"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, &without).unwrap();
    reload(&proxy, 2.0).await;
    two.kill();
    let errors = redis_errors(&metrics_of(&proxy).await);
    for i in 0..3 {
        let body = chat_body("cached", &format!("no redis {i}"), false);
        let (status, headers, _) = chat(&proxy, &body, &[]).await;
        assert_eq!(
            (status.as_u16(), header(&headers, "x-cache")),
            (200, Some("MISS"))
        );
    }
    let (_, headers, _) = chat(&proxy, &chat_body("cached", "no redis 0", false), &[]).await;
    assert_eq!(header(&headers, "x-cache-tier"), Some("memory"));
    assert_eq!(
        redis_errors(&metrics_of(&proxy).await),
        errors,
        "Redis is not asked"
    );

    let logs = stop(proxy).await;
    assert_eq!(
        logged(&logs, "redis settings changed (applied without restart)").len(),
        1,
        "{logs:#?}"
    );
    assert_eq!(
        logged(
            &logs,
            "redis removed from the config (applied without restart)"
        )
        .len(),
        1
    );
    assert!(
        logged(&logs, "applies only at restart").is_empty(),
        "{logs:#?}"
    );
    for line in &logs {
        assert!(!line.contains("redis://"), "a URL in the log: {line}");
    }
}
