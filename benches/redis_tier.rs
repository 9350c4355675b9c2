//! Cache tiers end to end, one client sending one request at a time: a fast in-process mock
//! upstream answered directly, and through the proxy as a miss (the upstream called, on replica
//! A), a Redis hit (tier 2: an answer A stored, asked of replica B, which never saw it) and then a
//! memory hit of the same prompt on B (filled by that Redis hit); next to them a bare Redis GET
//! of such an answer from the client, i.e. one Redis round trip. Two replicas A and B run in this process on a real `redis-server`, each on its own
//! one-thread runtime as the binary's default; rounds alternate in one run, and the output is a
//! markdown table.
//!
//! `cargo bench --bench redis_tier` (`-- --quick`, `--requests N`, `--rounds N`). Needs
//! `redis-server` on the PATH.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly on set-up errors"
)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A chat completion of about 1 KB, as the mock answers every request.
fn chat_completion() -> &'static Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| {
        let content = "The proxy forwards this answer unchanged. ".repeat(18);
        Bytes::from(
            serde_json::json!({
                "id": "gen-bench", "object": "chat.completion", "created": 1_700_000_000,
                "model": "openai/gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 57, "completion_tokens": 180, "total_tokens": 237}
            })
            .to_string(),
        )
    })
}

/// Runs `serve` on a one-thread runtime of its own thread, on a listener bound there; returns its
/// address once it listens.
fn on_own_thread<F, Fut>(name: &str, serve: F) -> SocketAddr
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                serve(listener).await;
            });
        })
        .unwrap();
    rx.recv().unwrap()
}

fn start_mock() -> SocketAddr {
    on_own_thread("mock-upstream", |listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    let mut response = Response::new(Full::new(chat_completion().clone()));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// A replica of the proxy on `redis`, in this process; it runs until the process ends.
fn start_replica(mock: SocketAddr, redis: &str, key_file: &std::path::Path) -> SocketAddr {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"http://{mock}/api/v1\"\napi_key_file = \"{}\"\n\
         [redis]\nurl = \"{redis}\"\n[cache]\ntier2 = \"redis\"\n\
         [log]\nlevel = \"warn\"\n\
         [[routes]]\nname = \"cached\"\nmatch = {{ model = \"cached\" }}\nmodel = \"m\"\ncache_ttl = \"1h\"\n",
        key_file.display()
    );
    let config = openrouter_proxy::Config::parse(&text).unwrap();
    on_own_thread("replica", move |api| async move {
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listeners = openrouter_proxy::Listeners { api, admin };
        let (_keep, never) = oneshot::channel::<()>();
        let _ = openrouter_proxy::serve(config, listeners, async move {
            let _ = never.await;
        })
        .await;
    })
}

/// A `redis-server` on a free port with no persistence; killed by its PID on drop.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn body(prompt: &str) -> Bytes {
    let body = serde_json::json!({
        "model": "cached", "messages": [{"role": "user", "content": prompt}]
    });
    Bytes::from(body.to_string())
}

/// One request; its latency, and the tier that answered (`MISS` for none).
async fn time_one(sender: &mut Sender, addr: SocketAddr, body: Bytes) -> (u64, String) {
    let request = Request::post("/v1/chat/completions")
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .unwrap();
    let sent = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let (parts, body) = response.into_parts();
    body.collect().await.unwrap();
    let took = sent.elapsed().as_nanos() as u64;
    let tier = parts
        .headers
        .get("x-cache-tier")
        .or(parts.headers.get("x-cache"));
    (
        took,
        tier.map_or("none", |v| v.to_str().unwrap()).to_owned(),
    )
}

/// The `p`th percentile of `samples` in microseconds.
fn percentile(samples: &mut [u64], p: f64) -> f64 {
    samples.sort_unstable();
    let index = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[index] as f64 / 1000.0
}

fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Samples {
    direct: Vec<u64>,
    miss: Vec<u64>,
    memory: Vec<u64>,
    redis: Vec<u64>,
    get: Vec<u64>,
    /// Answers of A that B did not find in Redis.
    lost: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Under `cargo test` (no --bench flag) there is nothing to measure.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let requests = flag(&args, "--requests", if quick { 200 } else { 2000 });
    let rounds = flag(&args, "--rounds", if quick { 2 } else { 5 });
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let samples = runtime.block_on(measure(&server, requests, rounds));
    print_table(samples, requests * rounds);
}

async fn measure(server: &RedisServer, requests: usize, rounds: usize) -> Samples {
    let mock = start_mock();
    let key_file = std::env::temp_dir().join(format!("orp-bench-key-{}", std::process::id()));
    std::fs::write(&key_file, "sk-or-bench\n").unwrap();
    let (a, b) = (
        start_replica(mock, &server.url, &key_file),
        start_replica(mock, &server.url, &key_file),
    );
    let client = ::redis::Client::open(server.url.as_str()).unwrap();
    let mut redis = loop {
        match client.get_multiplexed_async_connection().await {
            Ok(connection) => break connection,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let (mut to_mock, mut to_a, mut to_b) =
        (connect(mock).await, connect(a).await, connect(b).await);
    // Both replicas reach Redis (their first calls may come before it answers).
    wait_for_tier(&mut to_a, a, &mut to_b, b, &mut redis, "warm-up").await;

    let mut samples = Samples::default();
    for round in 0..rounds {
        let prompts: Vec<Bytes> = (0..requests)
            .map(|i| body(&format!("round {round} question {i}")))
            .collect();
        for prompt in &prompts {
            samples
                .direct
                .push(time_one(&mut to_mock, mock, prompt.clone()).await.0);
            let (took, tier) = time_one(&mut to_a, a, prompt.clone()).await;
            assert_eq!(tier, "MISS");
            samples.miss.push(took);
        }
        wait_writes(&mut redis).await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("orp:cache:*")
            .query_async(&mut redis)
            .await
            .unwrap();
        for prompt in &prompts {
            let (took, tier) = time_one(&mut to_b, b, prompt.clone()).await;
            match tier.as_str() {
                "redis" => samples.redis.push(took),
                // A's write was dropped (Redis counted as down for a moment): B asked upstream.
                "MISS" => samples.lost += 1,
                other => panic!("B never saw this prompt, yet it answered from {other}"),
            }
            // The same prompt again: now in B's memory, filled by the Redis hit.
            let (took, tier) = time_one(&mut to_b, b, prompt.clone()).await;
            assert_eq!(tier, "memory");
            samples.memory.push(took);
            let sent = Instant::now();
            let value: Option<Vec<u8>> = ::redis::cmd("GET")
                .arg(&keys[0])
                .query_async(&mut redis)
                .await
                .unwrap();
            samples.get.push(sent.elapsed().as_nanos() as u64);
            assert!(value.is_some());
        }
    }
    samples
}

/// Sends a new prompt through `a` until `b` answers it from Redis.
async fn wait_for_tier(
    to_a: &mut Sender,
    a: SocketAddr,
    to_b: &mut Sender,
    b: SocketAddr,
    redis: &mut ::redis::aio::MultiplexedConnection,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "{what}: no Redis hit on the second replica"
        );
        let prompt = body(&format!("{what} {i}"));
        time_one(to_a, a, prompt.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if time_one(to_b, b, prompt).await.1 == "redis" {
            let _: () = ::redis::cmd("FLUSHALL").query_async(redis).await.unwrap();
            return;
        }
    }
}

/// Waits until the writes off the request path have settled: Redis's key count has not changed
/// for 300 ms.
async fn wait_writes(redis: &mut ::redis::aio::MultiplexedConnection) {
    let mut last = usize::MAX;
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(300) {
        let size: usize = ::redis::cmd("DBSIZE").query_async(redis).await.unwrap();
        if size != last {
            (last, since) = (size, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn print_table(mut samples: Samples, count: usize) {
    let direct = percentile(&mut samples.direct, 50.0);
    println!("\n{count} requests of each kind, one client, one at a time:\n");
    if samples.lost > 0 {
        println!(
            "({} of A's answers never reached Redis: written while it counted as down)\n",
            samples.lost
        );
    }
    println!("| answer | p50 | p99 | p50 minus direct |");
    println!("|---|---:|---:|---:|");
    let rows: [(&str, &mut Vec<u64>); 5] = [
        ("direct to the mock upstream", &mut samples.direct),
        ("proxied miss (upstream called)", &mut samples.miss),
        ("proxied memory hit", &mut samples.memory),
        (
            "proxied Redis hit (tier 2, stored by the other replica)",
            &mut samples.redis,
        ),
        ("a bare Redis GET of one stored answer", &mut samples.get),
    ];
    for (name, values) in rows {
        let (p50, p99) = (percentile(values, 50.0), percentile(values, 99.0));
        println!(
            "| {name} | {p50:.0} µs | {p99:.0} µs | {:+.0} µs |",
            p50 - direct
        );
    }
}
