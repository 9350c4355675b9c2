//! Shared state on a real redis-server: rate limits across two replicas, per-replica fallback and
//! recovery when Redis is killed, restarted, paused or down at start-up, budgets shared and kept
//! across a restart of the proxy, the cache tier written on one replica and read on another, the
//! bounded write queue, and the checks of `[redis]`, `budget` and `tier2`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::redis::{metric, wait_up, RedisServer};
use common::{temp_file, PATIENCE};
use http::{header, HeaderValue};
use openrouter_proxy::config::{BudgetConfig, Config};
use openrouter_proxy::redis::{
    BudgetScope, Budgets, Period, Redis, RedisSettings, SharedLimiter, StoredAnswer, Tier2,
    BUDGET_SPENT, REDIS_ERRORS, REDIS_UP, TIER2_DROPPED,
};

/// `op_timeout` of replicas that must not fall back to local counting when the loaded test
/// machine stalls. A killed Redis refuses at once, so their calls stay short all the same.
const STEADY: &str = "5s";
/// `op_timeout` of replicas whose Redis is frozen (SIGSTOP): the first call waits this long.
const SHORT: &str = "300ms";
/// What a call may take at most while Redis is unavailable: `SHORT` and a generous margin.
const BOUND: Duration = Duration::from_secs(1);
/// The limit used below: one request per 6 s after a burst of 10, so that a test sending its
/// requests within 6 s sees exactly 10 admitted, or 11 if it took longer.
const N: u32 = 10;

/// Runs `call`, asserting that it returned within [`BOUND`].
async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = call.await;
    let took = started.elapsed();
    assert!(took < BOUND, "{what} took {took:?} with Redis unavailable");
    out
}

/// Polls `tier` until it holds `key`.
async fn stored(tier: &Tier2, key: u128) -> StoredAnswer {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(hit) = tier.get(key).await {
            return hit.answer;
        }
        assert!(
            Instant::now() < deadline,
            "answer {key:x} never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn answer(body: &'static str, content_type: &'static str) -> StoredAnswer {
    StoredAnswer {
        headers: vec![(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body: Bytes::from_static(body.as_bytes()),
        model: Some("openai/gpt-4o-mini".to_owned()),
    }
}

fn init() {
    openrouter_proxy::record::metrics::handle();
    openrouter_proxy::redis::describe_metrics();
}

#[tokio::test]
async fn a_rate_limit_holds_for_the_sum_of_two_replicas() {
    init();
    let server = RedisServer::start().await;
    let replicas = [
        (server.handle(STEADY).await, SharedLimiter::default()),
        (server.handle(STEADY).await, SharedLimiter::default()),
    ];
    let (mut admitted, mut refused) = (0, None);
    for i in 0..N + 10 {
        let (redis, limiter) = &replicas[i as usize % 2];
        match limiter.admit(Some(redis), "route:chat", N).await {
            Ok(()) => admitted += 1,
            Err(rejection) => refused = Some(rejection),
        }
    }
    assert!(admitted == N || admitted == N + 1, "{admitted} admitted");
    let refused = refused.unwrap();
    assert_eq!(refused.per_minute, N);
    assert!(
        refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(60),
        "{refused:?}"
    );
    let (redis, limiter) = &replicas[1];
    assert!(
        limiter.admit(Some(redis), "token:other", N).await.is_ok(),
        "each scope has its own allowance"
    );
}

#[tokio::test]
async fn a_request_is_charged_in_all_its_scopes_or_in_none() {
    init();
    let server = RedisServer::start().await;
    let (a, b) = (server.handle(STEADY).await, server.handle(STEADY).await);
    let (on_a, on_b) = (SharedLimiter::default(), SharedLimiter::default());
    let both = [("route:r", 3), ("token:t", 1)];
    assert!(on_a.admit_all(Some(&a), &both).await.is_ok());
    let refused = on_b.admit_all(Some(&b), &both).await.unwrap_err();
    assert_eq!((refused.scope.as_str(), refused.per_minute), ("token:t", 1));
    // The refused request took nothing from the route: two of its three remain.
    let route = [("route:r", 3)];
    assert!(on_b.admit_all(Some(&b), &route).await.is_ok());
    assert!(on_a.admit_all(Some(&a), &route).await.is_ok());
    let refused = on_a.admit_all(Some(&a), &route).await.unwrap_err();
    assert_eq!(refused.scope, "route:r");
}

/// Admits requests of a fresh scope on `a` until one is refused, then asks `b`: refused only if
/// the two share their count.
async fn shared(a: &(Redis, SharedLimiter), b: &(Redis, SharedLimiter), scope: &str) -> bool {
    for _ in 0..N + 2 {
        if a.1.admit(Some(&a.0), scope, N).await.is_err() {
            break;
        }
    }
    b.1.admit(Some(&b.0), scope, N).await.is_err()
}

#[tokio::test]
async fn without_redis_each_replica_counts_alone_and_sharing_resumes_after_a_restart() {
    init();
    let mut server = RedisServer::start().await;
    let replicas = [
        (server.handle(STEADY).await, SharedLimiter::default()),
        (server.handle(STEADY).await, SharedLimiter::default()),
    ];
    let errors = || metric(REDIS_ERRORS, &[("op", "rate_limit")]).unwrap_or(0.0);
    let errors_before = errors();
    server.kill();
    let mut admitted = [0, 0];
    for i in 0..2 * (N + 5) {
        let at = i as usize % 2;
        let (redis, limiter) = &replicas[at];
        let result = bounded("admit", limiter.admit(Some(redis), "route:down", N)).await;
        admitted[at] += u32::from(result.is_ok());
    }
    for count in admitted {
        assert!(count == N || count == N + 1, "per replica: {admitted:?}");
    }
    assert!(replicas.iter().all(|(redis, _)| !redis.is_up()));
    assert_eq!(metric(REDIS_UP, &[]), Some(0.0));
    let counted = errors() - errors_before;
    assert!(
        counted >= f64::from(2 * (N + 5)),
        "{counted} errors counted"
    );

    server.restart().await;
    let started = Instant::now();
    for (redis, _) in &replicas {
        wait_up(redis).await;
    }
    eprintln!(
        "both replicas used Redis again {:?} after it restarted",
        started.elapsed()
    );
    // A stall of the loaded test machine longer than op_timeout falls back for one call: ask again
    // with a fresh scope. Without sharing, every attempt fails.
    let mut attempts = 0;
    while !shared(&replicas[0], &replicas[1], &format!("route:up-{attempts}")).await {
        attempts += 1;
        assert!(
            attempts < 5,
            "limits are not shared again after the restart"
        );
    }
}

#[tokio::test]
async fn a_connection_closed_by_the_server_is_reopened_without_falling_back() {
    init();
    let server = RedisServer::start().await;
    let a = (server.handle(STEADY).await, SharedLimiter::default());
    let b = (server.handle(STEADY).await, SharedLimiter::default());
    for (redis, limiter) in [&a, &b] {
        assert!(limiter.admit(Some(redis), "route:warm", 100).await.is_ok());
    }
    // What a server `timeout` or a load balancer does to idle connections.
    let client = redis::Client::open(server.url()).unwrap();
    let mut own = client.get_multiplexed_async_connection().await.unwrap();
    let killed: u64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut own)
        .await
        .unwrap();
    assert!(killed >= 2, "{killed} connections closed");
    assert!(a.1.admit(Some(&a.0), "route:one", 1).await.is_ok());
    assert!(
        b.1.admit(Some(&b.0), "route:one", 1).await.is_err(),
        "the second request of the minute is refused by the shared count"
    );
    assert!(a.0.is_up() && b.0.is_up());
}

#[tokio::test]
async fn the_password_comes_from_the_url() {
    init();
    let server = RedisServer::start_with(Some("right-password")).await;
    let (redis, limiter) = (server.handle(STEADY).await, SharedLimiter::default());
    assert!(limiter.admit(Some(&redis), "route:auth", 1).await.is_ok());
    assert!(
        limiter.admit(Some(&redis), "route:auth", 1).await.is_err(),
        "counted in Redis"
    );

    let wrong = server.url().replace("right-password", "wrong-password");
    let text = format!("[redis]\nurl = \"{wrong}\"");
    let config = Config::parse(&text).unwrap();
    let settings = RedisSettings::resolve(config.redis.as_ref().unwrap()).unwrap();
    let refused = Redis::connect(settings).unwrap();
    let admitted = bounded("admit", limiter.admit(Some(&refused), "route:other", 1)).await;
    assert!(admitted.is_ok(), "served without Redis");
    assert!(!refused.is_up());
}

#[tokio::test]
async fn the_proxy_starts_without_redis_and_uses_it_once_it_is_there() {
    init();
    let mut server = RedisServer::start().await;
    server.kill();
    let redis = Redis::connect(server.settings(&format!("op_timeout = \"{STEADY}\""))).unwrap();
    let (limiter, tier) = (SharedLimiter::default(), Tier2::new(redis.clone()));
    for _ in 0..3 {
        let admitted = bounded("admit", limiter.admit(Some(&redis), "route:early", N)).await;
        assert!(admitted.is_ok());
        assert!(bounded("get", tier.get(7)).await.is_none());
    }
    assert!(!redis.is_up());
    server.restart().await;
    wait_up(&redis).await;
    tier.put(7, answer("{}", "application/json"), Duration::from_secs(60));
    assert_eq!(stored(&tier, 7).await.body, "{}");
}

#[tokio::test]
async fn a_paused_redis_bounds_every_call_and_is_used_again_once_resumed() {
    init();
    let server = RedisServer::start().await;
    let redis = server.handle(SHORT).await;
    let (limiter, budgets, tier) = (
        SharedLimiter::default(),
        Budgets::default(),
        Tier2::new(redis.clone()),
    );
    let budget = BudgetConfig {
        usd_per_day: Some(5.0),
        usd_per_month: None,
    };
    server.pause();
    for key in 0..3u128 {
        let admitted = bounded("admit", limiter.admit(Some(&redis), "route:frozen", N)).await;
        assert!(admitted.is_ok());
        let check = budgets.check(Some(&redis), BudgetScope::Route, "frozen", &budget);
        assert!(bounded("budget check", check).await.is_ok());
        let record = budgets.record(Some(&redis), BudgetScope::Route, "frozen", 0.01);
        bounded("budget record", record).await;
        assert!(bounded("get", tier.get(key)).await.is_none());
        bounded("put", async {
            tier.put(
                key,
                answer("{}", "application/json"),
                Duration::from_secs(60),
            )
        })
        .await;
    }
    assert!(!redis.is_up());
    server.resume();
    wait_up(&redis).await;
    tier.put(
        99,
        answer("[1]", "application/json"),
        Duration::from_secs(60),
    );
    assert_eq!(stored(&tier, 99).await.body, "[1]");
}

#[tokio::test]
async fn budgets_are_shared_by_replicas_and_outlive_a_restart_of_the_proxy() {
    init();
    let server = RedisServer::start().await;
    let (a, b) = (server.handle(STEADY).await, server.handle(STEADY).await);
    let (on_a, on_b) = (Budgets::default(), Budgets::default());
    let budget = BudgetConfig {
        usd_per_day: Some(1.0),
        usd_per_month: Some(10.0),
    };
    let name = "team-shared";
    assert!(on_a
        .check(Some(&a), BudgetScope::Token, name, &budget)
        .await
        .is_ok());
    on_a.record(Some(&a), BudgetScope::Token, name, 0.6).await;
    assert!(on_b
        .check(Some(&b), BudgetScope::Token, name, &budget)
        .await
        .is_ok());
    on_b.record(Some(&b), BudgetScope::Token, name, 0.5).await;
    for (redis, budgets) in [(&a, &on_a), (&b, &on_b)] {
        let refused = budgets
            .check(Some(redis), BudgetScope::Token, name, &budget)
            .await
            .unwrap_err();
        assert_eq!((refused.period, refused.budget_usd), (Period::Day, 1.0));
        assert!((refused.spent_usd - 1.1).abs() < 1e-9, "{refused:?}");
        let wait = refused.resets_at.duration_since(SystemTime::now()).unwrap();
        assert!(wait <= Duration::from_secs(86_400), "{refused:?}");
        assert!(refused.resets_at_rfc3339().ends_with("T00:00:00Z"));
    }
    let route = on_a
        .check(Some(&a), BudgetScope::Route, name, &budget)
        .await;
    assert!(route.is_ok(), "a route of the same name has its own budget");

    drop((a, b, on_a, on_b));
    let restarted = server.handle(STEADY).await;
    let fresh = Budgets::default();
    let refused = fresh
        .check(Some(&restarted), BudgetScope::Token, name, &budget)
        .await
        .unwrap_err();
    assert!((refused.spent_usd - 1.1).abs() < 1e-9, "{refused:?}");
    for period in ["day", "month"] {
        let labels = [("scope", "token"), ("name", name), ("period", period)];
        let spent = metric(BUDGET_SPENT, &labels).unwrap();
        assert!((spent - 1.1).abs() < 1e-9, "{period}: {spent}");
    }
    let keys = all_keys(&server).await;
    assert!(!keys.is_empty());
    for key in keys {
        assert!(!key.contains("team"), "a key holds a name: {key}");
    }
}

#[tokio::test]
async fn budgets_count_on_the_replica_while_redis_is_down_and_catch_up_after() {
    init();
    let mut server = RedisServer::start().await;
    let redis = server.handle(STEADY).await;
    let budgets = Budgets::default();
    let budget = BudgetConfig {
        usd_per_day: Some(1.0),
        usd_per_month: None,
    };
    let check = |redis| budgets.check(redis, BudgetScope::Route, "outage", &budget);
    budgets
        .record(Some(&redis), BudgetScope::Route, "outage", 0.5)
        .await;
    assert!(
        check(Some(&redis)).await.is_ok(),
        "0.5 read back from Redis"
    );
    server.kill();
    budgets
        .record(Some(&redis), BudgetScope::Route, "outage", 0.3)
        .await;
    assert!(
        bounded("check", check(Some(&redis))).await.is_ok(),
        "0.5 known + 0.3 local"
    );
    budgets
        .record(Some(&redis), BudgetScope::Route, "outage", 0.3)
        .await;
    let refused = bounded("check", check(Some(&redis))).await.unwrap_err();
    assert!((refused.spent_usd - 1.1).abs() < 1e-9, "{refused:?}");

    // Redis comes back empty (no persistence): what this replica spent meanwhile reaches it
    // with its next answer.
    server.restart().await;
    wait_up(&redis).await;
    budgets
        .record(Some(&redis), BudgetScope::Route, "outage", 0.1)
        .await;
    let other = server.handle(STEADY).await;
    let small = BudgetConfig {
        usd_per_day: Some(0.7),
        usd_per_month: None,
    };
    let refused = Budgets::default()
        .check(Some(&other), BudgetScope::Route, "outage", &small)
        .await
        .unwrap_err();
    assert!((refused.spent_usd - 0.7).abs() < 1e-9, "{refused:?}");
}

#[tokio::test]
async fn an_answer_stored_by_one_replica_is_read_by_another() {
    init();
    let server = RedisServer::start().await;
    let a = Tier2::new(server.handle(STEADY).await);
    let b = Tier2::new(server.handle(STEADY).await);
    let json = answer(r#"{"id":"x","choices":[]}"#, "application/json");
    let stream = answer(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
         data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
         data: [DONE]\n\n",
        "text/event-stream",
    );
    let (json_key, stream_key) = (u128::MAX - 1, 0x0123_4567_89ab_cdef_u128 << 64);
    assert!(b.get(json_key).await.is_none(), "a miss");
    a.put(json_key, json.clone(), Duration::from_secs(60));
    a.put(stream_key, stream.clone(), Duration::from_secs(60));
    assert_eq!(stored(&b, json_key).await, json);
    assert_eq!(stored(&b, stream_key).await, stream);
    let hit = b.get(json_key).await.unwrap();
    assert!(
        hit.ttl_left <= Duration::from_secs(60) && hit.ttl_left > Duration::from_secs(30),
        "{:?}",
        hit.ttl_left
    );
    let keys = all_keys(&server).await;
    assert!(
        keys.contains(&format!("orp:cache:{json_key:032x}")),
        "{keys:?}"
    );
}

/// A current-thread runtime: the writer cannot run while the test queues answers.
#[tokio::test(flavor = "current_thread")]
async fn a_full_write_queue_drops_the_write_and_counts_it() {
    init();
    let server = RedisServer::start().await;
    let redis = server.handle(STEADY).await;
    let dropped = || metric(TIER2_DROPPED, &[]).unwrap_or(0.0);
    let before = dropped();
    let tier = Tier2::with_queue(redis.clone(), 2, 1 << 20);
    for key in 0..5 {
        tier.put(
            key,
            answer("{}", "application/json"),
            Duration::from_secs(60),
        );
    }
    assert_eq!(dropped() - before, 3.0);
    stored(&tier, 0).await;
    stored(&tier, 1).await;
    for key in 2..5 {
        assert!(tier.get(key).await.is_none(), "{key} was dropped");
    }
    let small = Tier2::with_queue(redis, 100, 10);
    small.put(
        9,
        answer("a body over ten bytes", "text/plain"),
        Duration::from_secs(60),
    );
    assert_eq!(dropped() - before, 4.0, "over the byte bound");
}

/// Every key in the server, read with a connection of the test's own.
async fn all_keys(server: &RedisServer) -> Vec<String> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[test]
fn config_errors_name_the_key_and_never_the_url() {
    let secret = "hunter2-secret";
    let cases = [
        ("[redis]\nkey_prefix = \"x:\"", "redis"),
        ("[redis]\nurl = \"redis://a\"\nurl_env = \"R\"", "exactly one"),
        (&*format!("[redis]\nurl = \"http://u:{secret}@host\""), "redis.url"),
        (&*format!("[redis]\nurl = \"redis://u:{secret}@\""), "redis.url"),
        ("[redis]\nurl_env = \"\"", "redis.url_env"),
        ("[redis]\nurl_env = \"R\"\nkey_prefix = \"\"", "redis.key_prefix"),
        ("[redis]\nurl_env = \"R\"\nkey_prefix = \"a b\"", "redis.key_prefix"),
        ("[redis]\nurl_env = \"R\"\nop_timeout = \"0s\"", "redis.op_timeout"),
        ("[redis]\nurl_env = \"R\"\nop_timeout = \"1m\"", "redis.op_timeout"),
        ("[redis]\nurl_env = \"R\"\nop_timeout = \"soon\"", "invalid duration"),
        ("[redis]\nurl_env = \"R\"\npool_size = 0", "redis.pool_size"),
        ("[redis]\nurl_env = \"R\"\npool_size = 65", "redis.pool_size"),
        ("[redis]\nurl_env = \"R\"\nhost = \"h\"", "host"),
        ("[cache]\ntier2 = \"redis\"", "cache.tier2"),
        ("[cache]\ntier2 = \"memcached\"\n[redis]\nurl_env = \"R\"", "cache.tier2"),
        (
            "[server]\ntokens = [{ name = \"t\", sha256 = \"$H\", budget = { usd_per_day = -1.0 } }]",
            "server.tokens[0].budget.usd_per_day",
        ),
        ("[[routes]]\nname = \"r\"\nbudget = {}", "routes[0].budget"),
        (
            "[[routes]]\nname = \"r\"\nbudget = { usd_per_month = 0.0 }",
            "routes[0].budget.usd_per_month",
        ),
        ("[[routes]]\nname = \"r\"\nbudget = { usd_per_week = 1.0 }", "usd_per_week"),
    ];
    let hash = "0".repeat(64);
    for (text, needle) in cases {
        let text = text.replace("$H", &hash);
        let error = Config::parse(&text).unwrap_err().to_string();
        assert!(error.contains(needle), "{text:?} gave {error:?}");
        assert!(!error.contains(secret), "{text:?} showed the URL: {error}");
    }
    let good = "[redis]\nurl_env = \"REDIS_URL\"\n[cache]\ntier2 = \"redis\"\n\
                [[routes]]\nname = \"r\"\nbudget = { usd_per_day = 50.0, usd_per_month = 1000.0 }";
    let config = Config::parse(good).unwrap();
    let redis = config.redis.unwrap();
    assert_eq!((redis.key_prefix.as_str(), redis.pool_size), ("orp:", 8));
    assert_eq!(redis.op_timeout, Duration::from_millis(50));
}

#[test]
fn the_url_is_read_from_its_source_without_being_shown() {
    let missing =
        Config::parse("[redis]\nurl_env = \"OPENROUTER_PROXY_TEST_NO_SUCH_VAR\"").unwrap();
    let error = RedisSettings::resolve(missing.redis.as_ref().unwrap()).unwrap_err();
    assert!(
        error.contains("OPENROUTER_PROXY_TEST_NO_SUCH_VAR"),
        "{error}"
    );

    let file = temp_file("redis-url", "redis://:first-secret@127.0.0.1:1/0\n");
    let text = format!("[redis]\nurl_file = {:?}", file.display().to_string());
    let config = Config::parse(&text).unwrap();
    let first = RedisSettings::resolve(config.redis.as_ref().unwrap()).unwrap();
    assert!(!format!("{first:?}").contains("first-secret"));
    std::fs::write(&file, "redis://:second-secret@127.0.0.1:1/0").unwrap();
    let second = RedisSettings::resolve(config.redis.as_ref().unwrap()).unwrap();
    assert_ne!(first, second, "a rotated Secret is read again");
    std::fs::write(&file, "http://:third-secret@127.0.0.1:1").unwrap();
    let error = RedisSettings::resolve(config.redis.as_ref().unwrap()).unwrap_err();
    assert!(
        error.contains("redis://") && !error.contains("third-secret"),
        "{error}"
    );
}
