//! Chaos: faults injected while clients keep sending. A primary model that fails in every way
//! the proxy knows while a fallback is configured (nothing may be lost), an upstream killed and
//! restarted on the same port (fail fast while down, recover without a proxy restart), and
//! slowloris clients (closed by the header-read timeout, never starving normal clients).
//! Each scenario prints `chaos: <fault> sent=N ok=N lost=N` lines.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(
    clippy::too_many_lines,
    reason = "each scenario reads top to bottom: load, fault, then every check of its outcome"
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str =
    r#"{"model":"chat","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// How the primary model fails during one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Status503,
    RateLimited,
    Close,
    Hang,
    /// An "unavailable" answer: an SSE error event before any content, or a JSON error with
    /// status 200.
    Unavailable,
    /// A stream that ends (or a connection that closes) before any content.
    Truncated,
}

const WINDOWS: &[Fault] = &[
    Fault::None,
    Fault::Status503,
    Fault::RateLimited,
    Fault::Close,
    Fault::Hang,
    Fault::Unavailable,
    Fault::Truncated,
    Fault::None,
];

fn fault_name(fault: Fault) -> &'static str {
    match fault {
        Fault::None => "none",
        Fault::Status503 => "primary 503",
        Fault::RateLimited => "primary 429 retry-after 3600",
        Fault::Close => "primary closes the connection",
        Fault::Hang => "primary never answers",
        Fault::Unavailable => "primary unavailable (error before content)",
        Fault::Truncated => "primary ends before content",
    }
}

fn primary_reply(fault: Fault, request: &Recorded) -> Reply {
    let streaming = request.json()["stream"] == true;
    match fault {
        Fault::None => openai_like_reply(request),
        Fault::Status503 => Reply::Json(
            503,
            r#"{"error":{"message":"overloaded","code":503}}"#.into(),
        ),
        Fault::RateLimited => Reply::Headers(
            vec![("retry-after", "3600")],
            Box::new(Reply::Json(
                429,
                r#"{"error":{"message":"slow down","code":429}}"#.into(),
            )),
        ),
        Fault::Close => Reply::Close,
        Fault::Hang => Reply::Hang,
        Fault::Unavailable if streaming => Reply::Sse(vec![
            ": OPENROUTER PROCESSING\n\n".into(),
            "data: {\"error\":{\"message\":\"No endpoints found\",\"code\":503}}\n\n".into(),
        ]),
        Fault::Unavailable => Reply::Json(
            200,
            r#"{"error":{"message":"No endpoints found","code":503}}"#.into(),
        ),
        Fault::Truncated if streaming => Reply::Sse(vec![": OPENROUTER PROCESSING\n\n".into()]),
        Fault::Truncated => Reply::Close,
    }
}

/// Per-window counts.
#[derive(Default)]
struct Counts {
    sent: AtomicUsize,
    ok: AtomicUsize,
    served_by_backup: AtomicUsize,
}

/// A valid answer: 200 and a complete chat completion or stream.
fn valid_answer(streaming: bool, status: http::StatusCode, body: &[u8]) -> bool {
    if status != 200 {
        return false;
    }
    if streaming {
        let text = String::from_utf8_lossy(body);
        text.contains("\"Hello\"")
            && text.contains("\" mock\"")
            && text.ends_with("data: [DONE]\n\n")
            && !text.contains("\"error\"")
    } else {
        serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v["choices"][0]["message"]["content"] == "Hello from the mock")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_primary_loses_no_request_with_a_fallback() {
    let window = Duration::from_millis(env_number("CHAOS_WINDOW_MS", 400));
    let fault = Arc::new(Mutex::new(Fault::None));
    let upstream = {
        let fault = fault.clone();
        MockUpstream::start(move |request| {
            if request.json()["model"] == "primary" {
                primary_reply(*fault.lock().unwrap(), request)
            } else {
                openai_like_reply(request)
            }
        })
        .await
    };
    let proxy = TestProxy::start(
        &upstream,
        r#"
        [fallback]
        cooldown = "150ms"
        cooldown_failures = 2

        [[routes]]
        name = "chat"
        match = { model = "chat" }
        model = "primary"
        fallbacks = ["backup"]
        # Long enough that a loaded machine never times out the backup's answer, which is the
        # last attempt: nothing may be lost.
        first_byte_timeout = "2s"
        "#,
    )
    .await;
    let url = proxy.url("/v1/chat/completions");

    let counts: Arc<Vec<Counts>> = Arc::new(WINDOWS.iter().map(|_| Counts::default()).collect());
    let current = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let lost_detail = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..6 {
        let (counts, current, running, url, lost_detail) = (
            counts.clone(),
            current.clone(),
            running.clone(),
            url.clone(),
            lost_detail.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut n = worker;
            while running.load(Ordering::SeqCst) {
                n += 1;
                let streaming = n % 2 == 0;
                let at = current.load(Ordering::SeqCst);
                counts[at].sent.fetch_add(1, Ordering::SeqCst);
                let (status, headers, body) =
                    post_json(&url, if streaming { STREAM } else { CHAT }, &[]).await;
                if valid_answer(streaming, status, &body) {
                    counts[at].ok.fetch_add(1, Ordering::SeqCst);
                    if headers.get("x-proxy-model").is_some_and(|m| m == "backup") {
                        counts[at].served_by_backup.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    lost_detail.lock().unwrap().push(format!(
                        "{:?} streaming={streaming}: {status} {}",
                        WINDOWS[at],
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
        }));
    }
    for (i, &window_fault) in WINDOWS.iter().enumerate() {
        *fault.lock().unwrap() = window_fault;
        current.store(i, Ordering::SeqCst);
        tokio::time::sleep(window).await;
    }
    // Back to normal: the primary serves again once its cool-down is over.
    let recovered = Instant::now();
    loop {
        let (status, headers, _) = post_json(&url, CHAT, &[]).await;
        assert_eq!(status, 200);
        if headers["x-proxy-model"] == "primary" {
            break;
        }
        assert!(
            recovered.elapsed() < PATIENCE,
            "the primary never served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.store(false, Ordering::SeqCst);
    for worker in workers {
        tokio::time::timeout(PATIENCE, worker)
            .await
            .expect("a client hung")
            .unwrap();
    }

    let mut lost_total = 0;
    for (fault, counts) in WINDOWS.iter().zip(counts.iter()) {
        let sent = counts.sent.load(Ordering::SeqCst);
        let ok = counts.ok.load(Ordering::SeqCst);
        println!(
            "chaos: {:<44} sent={sent:<4} ok={ok:<4} lost={} via_backup={}",
            fault_name(*fault),
            sent - ok,
            counts.served_by_backup.load(Ordering::SeqCst)
        );
        lost_total += sent - ok;
        if *fault != Fault::None {
            assert!(sent > 0, "no request was sent while {fault:?}");
            assert!(
                counts.served_by_backup.load(Ordering::SeqCst) > 0,
                "the backup never served while {fault:?}"
            );
        }
    }
    assert_eq!(lost_total, 0, "lost: {:#?}", lost_detail.lock().unwrap());
}

/// Phases of the kill-and-restart run, counted up at every change: even numbers are steady
/// (up or down), odd numbers are a kill or a restart in progress.
const UP: u64 = 0;
const DOWN: u64 = 2;

#[derive(Default)]
struct KillCounts {
    up_sent: AtomicUsize,
    up_ok: AtomicUsize,
    down_sent: AtomicUsize,
    down_failed_fast: AtomicUsize,
    transition_sent: AtomicUsize,
    transition_answered: AtomicUsize,
    slowest_down_ms: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upstream_fails_fast_and_recovers_on_the_same_port() {
    let phase_time = Duration::from_millis(env_number("CHAOS_WINDOW_MS", 400));
    let upstream = Arc::new(KillableUpstream::start(openai_like_reply).await);
    let proxy = TestProxy::start_for(
        &upstream.url(),
        r#"
        [upstream]
        connect_timeout = "1s"

        [fallback]
        cooldown = "0s"

        [[routes]]
        name = "chat"
        match = { model = "chat" }
        model = "primary"
        fallbacks = ["primary-again"]
        first_byte_timeout = "2s"
        "#,
    )
    .await;
    let url = proxy.url("/v1/chat/completions");
    let phase = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let counts = Arc::new(KillCounts::default());
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));

    let mut workers = Vec::new();
    for worker in 0..4 {
        let (phase, running, counts, url, wrong) = (
            phase.clone(),
            running.clone(),
            counts.clone(),
            url.clone(),
            wrong.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut n = worker;
            while running.load(Ordering::SeqCst) {
                n += 1;
                let streaming = n % 3 == 0;
                let before = phase.load(Ordering::SeqCst);
                let started = Instant::now();
                let (status, headers, body) =
                    post_json(&url, if streaming { STREAM } else { CHAT }, &[]).await;
                let took = started.elapsed();
                let after = phase.load(Ordering::SeqCst);
                let steady = before == after && before % 2 == 0;
                let good = valid_answer(streaming, status, &body);
                // Every failure is the proxy's OpenAI-shaped summary of the attempts.
                let shaped_failure = status == 502
                    && headers.get("x-should-retry").is_some_and(|v| v == "false")
                    && serde_json::from_slice::<serde_json::Value>(&body)
                        .is_ok_and(|v| v["error"]["code"] == "all_attempts_failed");
                if steady && before % 4 == UP {
                    counts.up_sent.fetch_add(1, Ordering::SeqCst);
                    if good {
                        counts.up_ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        wrong.lock().unwrap().push(format!(
                            "up, phase {before}: {status} {}",
                            String::from_utf8_lossy(&body)
                        ));
                    }
                } else if steady && before % 4 == DOWN {
                    counts.down_sent.fetch_add(1, Ordering::SeqCst);
                    counts
                        .slowest_down_ms
                        .fetch_max(took.as_millis() as u64, Ordering::SeqCst);
                    // 502 is a refused connection; a timeout would have been a 504.
                    if shaped_failure {
                        counts.down_failed_fast.fetch_add(1, Ordering::SeqCst);
                    } else {
                        wrong.lock().unwrap().push(format!(
                            "down, phase {before}, {took:?}: {status} {headers:?} {}",
                            String::from_utf8_lossy(&body)
                        ));
                    }
                } else {
                    counts.transition_sent.fetch_add(1, Ordering::SeqCst);
                    if good || shaped_failure {
                        counts.transition_answered.fetch_add(1, Ordering::SeqCst);
                    } else {
                        wrong.lock().unwrap().push(format!(
                            "transition {before}->{after}: {status} {}",
                            String::from_utf8_lossy(&body)
                        ));
                    }
                }
            }
        }));
    }

    let step = |phase: &AtomicU64| phase.fetch_add(1, Ordering::SeqCst);
    for _cycle in 0..2 {
        tokio::time::sleep(phase_time).await;
        step(&phase); // killing
        upstream.kill().await;
        step(&phase); // down
        tokio::time::sleep(phase_time).await;
        step(&phase); // restarting
        upstream.restart().await;
        step(&phase); // up again, same proxy
    }
    tokio::time::sleep(phase_time).await;
    running.store(false, Ordering::SeqCst);
    for worker in workers {
        tokio::time::timeout(PATIENCE, worker)
            .await
            .expect("a client hung")
            .unwrap();
    }

    let load = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    println!(
        "chaos: {:<44} sent={:<4} ok={:<4} lost={}",
        "upstream up (before, between, after kills)",
        load(&counts.up_sent),
        load(&counts.up_ok),
        load(&counts.up_sent) - load(&counts.up_ok)
    );
    println!(
        "chaos: {:<44} sent={:<4} failed_fast={:<4} wrong={} slowest={}ms",
        "upstream killed (502 all_attempts_failed)",
        load(&counts.down_sent),
        load(&counts.down_failed_fast),
        load(&counts.down_sent) - load(&counts.down_failed_fast),
        counts.slowest_down_ms.load(Ordering::SeqCst)
    );
    println!(
        "chaos: {:<44} sent={:<4} answered={:<4} wrong={}",
        "during a kill or restart",
        load(&counts.transition_sent),
        load(&counts.transition_answered),
        load(&counts.transition_sent) - load(&counts.transition_answered)
    );
    assert!(
        wrong.lock().unwrap().is_empty(),
        "{:#?}",
        wrong.lock().unwrap()
    );
    assert!(load(&counts.up_sent) > 0 && load(&counts.down_sent) > 0);
    assert!(upstream.request_count() > 0);
}

/// Connects, then sends a request head one byte at a time, slower than the header-read timeout
/// allows, and returns how long after connecting the proxy closed the connection (`None`: still
/// open at `give_up`). `connected` counts the connections made.
async fn slowloris(
    proxy: std::net::SocketAddr,
    connected: Arc<AtomicUsize>,
    pause: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    connected.fetch_add(1, Ordering::SeqCst);
    let started = Instant::now();
    let (mut read, mut write) = stream.split();
    let mut buf = [0u8; 1024];
    let closed = async {
        // Whatever the proxy sends (a 408, or nothing), the connection must end.
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let dribble = async {
        for byte in head.iter().cycle() {
            if write.write_all(&[*byte]).await.is_err() {
                // The proxy closed its side: wait for the read side to say so as well.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(pause).await;
        }
    };
    tokio::select! {
        _ = closed => Some(started.elapsed()),
        _ = dribble => None,
        _ = tokio::time::sleep(give_up) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_and_do_not_starve_others() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(&upstream, "[server]\nheader_read_timeout = \"500ms\"\n").await;
    let slow_clients = env_number("CHAOS_SLOWLORIS", 200) as usize;
    // Far past the timeout: a proxy that does not cut them off is caught, however loaded the
    // machine (how long the cut took is printed, not asserted).
    let give_up = PATIENCE;

    let connected = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    // In batches: the test's listener has the default accept queue of 128, and a burst larger
    // than that would measure SYN retransmits instead of the proxy.
    for _ in 0..slow_clients {
        slow.push(tokio::spawn(slowloris(
            proxy.addr,
            connected.clone(),
            Duration::from_millis(100),
            give_up,
        )));
        if slow.len() % 50 == 0 {
            wait_until("a batch of slow clients to connect", || {
                connected.load(Ordering::SeqCst) == slow.len()
            })
            .await;
        }
    }
    wait_until("the slow clients to connect", || {
        connected.load(Ordering::SeqCst) == slow_clients
    })
    .await;

    // Normal clients keep being served while the slow ones hold their connections.
    let mut sent = 0;
    let mut ok = 0;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let began = Instant::now();
        let batch: Vec<_> = (0..4)
            .map(|i| {
                let url = proxy.url("/v1/chat/completions");
                tokio::spawn(async move {
                    let body = if i % 2 == 0 { CHAT } else { STREAM };
                    let (status, _, bytes) = post_json(&url, body, &[]).await;
                    valid_answer(i % 2 == 1, status, &bytes)
                })
            })
            .collect();
        for request in batch {
            sent += 1;
            if request.await.unwrap() {
                ok += 1;
            }
        }
        slowest = slowest.max(began.elapsed());
    }

    let mut cut = Vec::new();
    let mut never_cut = 0;
    for client in slow {
        match client.await.unwrap() {
            Some(after) => cut.push(after),
            None => never_cut += 1,
        }
    }
    cut.sort();
    let latest_cut = cut.last().copied().unwrap_or_default();
    println!(
        "chaos: {:<44} sent={sent:<4} ok={ok:<4} lost={} slowest_batch={}ms",
        format!("{slow_clients} slowloris connections open"),
        sent - ok,
        slowest.as_millis()
    );
    println!(
        "chaos: {:<44} cut={:<4} never_cut={never_cut} latest_cut={}ms",
        "slowloris connections closed by the proxy",
        cut.len(),
        latest_cut.as_millis()
    );
    assert_eq!(ok, sent, "normal clients were starved");
    assert_eq!(never_cut, 0, "slowloris connections were never closed");
}

/// With the connection limit lower than the number of slow clients, the surplus waits in the
/// accept queue; the header-read timeout frees the slots, so a normal client still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_beyond_the_connection_limit_only_delays_others() {
    let upstream = MockUpstream::openai_like().await;
    let proxy = TestProxy::start(
        &upstream,
        "[server]\nheader_read_timeout = \"300ms\"\nmax_connections = 20\n",
    )
    .await;
    let connected = Arc::new(AtomicUsize::new(0));
    let slow: Vec<_> = (0..60)
        .map(|_| {
            tokio::spawn(slowloris(
                proxy.addr,
                connected.clone(),
                Duration::from_millis(50),
                PATIENCE,
            ))
        })
        .collect();
    // Connected means queued by the kernel: 20 are being served, the rest wait to be accepted.
    wait_until("the slow clients to connect", || {
        connected.load(Ordering::SeqCst) == 60
    })
    .await;
    let started = Instant::now();
    let (status, _, body) = post_json(&proxy.url("/v1/chat/completions"), CHAT, &[]).await;
    let waited = started.elapsed();
    assert!(valid_answer(false, status, &body), "{status}");
    let mut cut = 0;
    for client in slow {
        if client.await.unwrap().is_some() {
            cut += 1;
        }
    }
    println!(
        "chaos: {:<44} sent=1    ok=1    lost=0 waited={}ms cut={cut}/60",
        "60 slowloris, max_connections = 20",
        waited.as_millis()
    );
    // The normal client was answered (post_json fails the test after PATIENCE otherwise), and
    // every slow one was cut; how long the wait was is printed, not asserted.
    assert_eq!(cut, 60, "slowloris connections were never closed");
}

/// The accept queue of the real binary's API listener. `max_connections` promises that surplus
/// connections wait in the kernel's accept queue, and a sidecar's app may open hundreds at
/// once; a queue of 128 (what `tokio::net::TcpListener::bind` asks for) drops the rest of a
/// burst, and those clients wait a second or more for their SYN to be retransmitted.
#[tokio::test]
async fn the_binary_listens_with_a_deep_accept_queue() {
    let upstream = MockUpstream::openai_like().await;
    let config = proxy_config_file(&upstream.url(), "");
    let proxy = BinaryProxy::spawn(&config, &[]).await;
    let api: std::net::SocketAddr = proxy.api.parse().unwrap();
    // For a listening socket, `ss` shows the accept queue's size as Send-Q.
    let output = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", api.port())])
        .output()
        .expect("`ss` (iproute2) is needed to read the accept queue's size");
    let text = String::from_utf8_lossy(&output.stdout);
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `ss` output: {text:?}"));
    println!("chaos: api listener accept queue = {backlog}");
    let mut proxy = proxy;
    proxy.child.kill().await.unwrap();
    assert!(
        backlog >= 1024,
        "the API listener's accept queue holds only {backlog} connections"
    );
}
