//! Two replicas of the real binary while their `redis-server` is killed (SIGKILL) or frozen
//! (SIGSTOP): every request is still answered, within a bound, without an error; cache misses go
//! upstream; rate limits count per replica; `openrouter_redis_up` drops to 0 and the errors
//! counter rises. Once Redis is back (a new server on the same port, or SIGCONT), both replicas
//! use it again by themselves: tier-2 hits and shared limits work, with no restart.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::replicas::{
    chat, chat_body, gauge, header, metrics_of, redis_errors, replica_config, start_pair, stop,
    wait_metric,
};
use common::{
    chat_completion, openai_like_reply, post_json, read_all, send, BinaryProxy, MockUpstream,
};
use common::{Reply, PATIENCE};
use tokio::sync::watch;

/// Long enough not to fall back when the loaded test machine stalls; a frozen Redis holds the
/// calls in flight this long, then none until it answers again.
const OP_TIMEOUT: &str = "1s";
/// What one request may take while Redis is unavailable: far above `OP_TIMEOUT`, far below a
/// hang (a frozen Redis never answers).
const BOUND: Duration = Duration::from_secs(10);
/// The rate limit of the routes below.
const N: usize = 3;

const ROUTES: &str = "[[routes]]\nname = \"cached\"\nmatch = { model = \"cached\" }\nmodel = \"m\"\ncache_ttl = \"10m\"\n\
     [[routes]]\nname = \"limited-down\"\nmatch = { model = \"limited-down\" }\nmodel = \"m\"\nrequests_per_minute = 3\n\
     [[routes]]\nname = \"limited-up\"\nmatch = { model = \"limited-up\" }\nmodel = \"m\"\nrequests_per_minute = 3\n";

/// The mock: chat answers that echo the prompt, so that a stored answer can be found in Redis.
async fn echoing_upstream() -> MockUpstream {
    MockUpstream::start(|request| {
        let body = request.json();
        match body["messages"][0]["content"].as_str() {
            Some(prompt) if body["stream"] != true => Reply::Json(
                200,
                chat_completion(body["model"].as_str().unwrap(), prompt),
            ),
            _ => openai_like_reply(request),
        }
    })
    .await
}

/// A chat request that must succeed within [`BOUND`].
async fn answered(proxy: &BinaryProxy, model: &str, prompt: &str) -> http::HeaderMap {
    let started = Instant::now();
    let (status, headers, body) = chat(proxy, &chat_body(model, prompt, false), &[]).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{prompt}: {}", String::from_utf8_lossy(&body));
    assert!(took < BOUND, "{prompt} took {took:?}");
    headers
}

/// Requests sent one after another to `api` (cacheable misses and memory hits) until `stop`
/// turns true: how many were answered, and every failure or answer slower than [`BOUND`].
async fn load(
    api: String,
    name: &'static str,
    mut stop: watch::Receiver<bool>,
) -> (usize, Vec<String>) {
    let url = format!("http://{api}/v1/chat/completions");
    let (mut answered, mut failures) = (0, Vec::new());
    for i in 0usize.. {
        if *stop.borrow_and_update() {
            break;
        }
        // Every third request repeats an earlier prompt: a memory hit once it was answered.
        let prompt = format!("{name} load {}", if i % 3 == 2 { i - 2 } else { i });
        let started = Instant::now();
        let (status, _, _) = post_json(&url, &chat_body("cached", &prompt, false), &[]).await;
        let took = started.elapsed();
        answered += 1;
        if status != 200 || took >= BOUND {
            failures.push(format!("{prompt}: {status} after {took:?}"));
        }
    }
    (answered, failures)
}

/// How many of `count` requests for `model` `proxy` admits.
async fn admitted(proxy: &BinaryProxy, model: &str, count: usize) -> usize {
    let mut admitted = 0;
    for i in 0..count {
        let body = chat_body(model, &format!("{model} {i}"), false);
        let (status, _, _) = chat(proxy, &body, &[]).await;
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
    }
    admitted
}

/// Waits until an answer holding `marker` is in the cache tier of `server`.
async fn wait_stored(server: &RedisServer, marker: &str) {
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("orp:cache:*")
            .query_async(&mut connection)
            .await
            .unwrap();
        for key in keys {
            let value: Option<Vec<u8>> = ::redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
            if value.is_some_and(|v| v.windows(marker.len()).any(|w| w == marker.as_bytes())) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{marker:?} never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Freeze,
}

async fn outage_and_recovery(fault: Fault) {
    let mut server = RedisServer::start().await;
    let upstream = echoing_upstream().await;
    let config = replica_config(&server, &upstream.url(), OP_TIMEOUT, ROUTES);
    let (a, b) = start_pair(&config).await;
    let errors_before = [
        redis_errors(&metrics_of(&a).await),
        redis_errors(&metrics_of(&b).await),
    ];

    // Clients keep sending to both replicas while Redis fails under them.
    let (stop_load, stopped) = watch::channel(false);
    let loads = [
        tokio::spawn(load(a.api.clone(), "a", stopped.clone())),
        tokio::spawn(load(b.api.clone(), "b", stopped)),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    match fault {
        Fault::Kill => server.kill(),
        Fault::Freeze => server.pause(),
    }
    for i in 0..6 {
        let proxy = [&a, &b][i % 2];
        let prompt = format!("{fault:?} outage prompt {i}");
        let headers = answered(proxy, "cached", &prompt).await;
        assert_eq!(header(&headers, "x-cache"), Some("MISS"));
        let seen = upstream
            .requests()
            .iter()
            .any(|r| r.json()["messages"][0]["content"] == prompt.as_str());
        assert!(seen, "the miss went upstream");
    }
    for (proxy, before) in [(&a, errors_before[0]), (&b, errors_before[1])] {
        wait_metric(proxy, "redis down and errors counted", |m| {
            gauge(m, "openrouter_redis_up") == Some(0.0) && redis_errors(m) > before
        })
        .await;
        let url = format!("http://{}/readyz", proxy.admin);
        let (status, _, _) = read_all(send("GET", &url, &[], "").await).await;
        assert_eq!(status, 200, "Redis is not needed to serve");
    }
    stop_load.send(true).unwrap();
    for task in loads {
        let (answered, failures) = task.await.unwrap();
        assert!(
            answered > 0 && failures.is_empty(),
            "under load: {failures:?}"
        );
    }
    // Without Redis each replica counts on its own: each admits its own N (N + 1 if slow).
    for proxy in [&a, &b] {
        let count = admitted(proxy, "limited-down", N + 2).await;
        assert!(
            count == N || count == N + 1,
            "{fault:?}: {count} admitted alone"
        );
    }

    match fault {
        Fault::Kill => server.restart().await,
        Fault::Freeze => server.resume(),
    }
    used_again(&server, &a, &b, fault).await;
    stop(a).await;
    stop(b).await;
}

/// Once Redis answers again: both replicas up, a tier-2 hit across them, shared limits.
async fn used_again(server: &RedisServer, a: &BinaryProxy, b: &BinaryProxy, fault: Fault) {
    for proxy in [a, b] {
        wait_metric(proxy, "redis up again", |m| {
            gauge(m, "openrouter_redis_up") == Some(1.0)
        })
        .await;
    }
    let prompt = format!("{fault:?} after recovery");
    let headers = answered(a, "cached", &prompt).await;
    assert_eq!(header(&headers, "x-cache"), Some("MISS"));
    wait_stored(server, &prompt).await;
    let headers = answered(b, "cached", &prompt).await;
    assert_eq!(header(&headers, "x-cache"), Some("HIT"));
    assert_eq!(header(&headers, "x-cache-tier"), Some("redis"));
    // Shared again: once A has used up the route's allowance, B refuses too.
    let on_a = admitted(a, "limited-up", N + 2).await;
    assert!(on_a == N || on_a == N + 1, "{on_a}");
    assert_eq!(
        admitted(b, "limited-up", 1).await,
        0,
        "B counts A's requests"
    );
}

#[tokio::test]
async fn a_killed_redis_is_served_around_and_a_new_one_on_its_port_is_used_again() {
    outage_and_recovery(Fault::Kill).await;
}

#[tokio::test]
async fn a_frozen_redis_bounds_every_request_and_is_used_again_once_it_resumes() {
    outage_and_recovery(Fault::Freeze).await;
}
