//! Soak: thousands of concurrent streams through the in-process proxy, with clients going away at
//! random moments, then a check that nothing stayed behind: upstream connections, tasks, memory
//! and the active-request gauge all return to where they started.
//!
//! Two warm-up storms come first: they size the allocator's heap for the load (resident memory
//! after a storm stays above the start however well everything is freed). Each storm after them
//! must leave tasks, connections and the gauge exactly at the baseline and resident memory within
//! `SOAK_RSS_SLACK_KIB_PER_STREAM` (default 20 KiB, so 20 MiB for 1000 streams) of where the
//! warm-up left it.
//!
//! `SOAK_STREAMS` sets the streams per storm (default 1000; e.g. 10000 for a long run, which needs
//! `ulimit -n` of at least 4 x streams + 1024: each stream holds four sockets in this process),
//! `SOAK_ROUNDS` the storms after the warm-up (default 1) and `SOAK_SEED` the seed of the
//! disconnect schedule, printed with the results.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(
    clippy::too_many_lines,
    reason = "each scenario reads top to bottom: load, fault, then every check of its outcome"
)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

/// Content chunks each stream carries after the first one.
const CHUNKS: usize = 8;
const BODY: &str =
    r#"{"model":"soak","stream":true,"messages":[{"role":"user","content":"hold on"}]}"#;

/// How a client behaves; chosen per client by the seeded generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Sends the request and hangs up before any answer.
    Early,
    /// Hangs up right after the first chunk, while the stream is held open.
    AfterFirst,
    /// Hangs up after some of the chunks that follow.
    Midway(usize),
    /// Reads the whole stream.
    Full,
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Clients that received their first chunk (all but `Early`).
    first_chunk: AtomicUsize,
    /// `Early` and `AfterFirst` clients that have hung up.
    gone: AtomicUsize,
    /// `Full` clients with a complete, well-formed stream.
    complete: AtomicUsize,
    /// `Full` clients whose stream was broken, cut or malformed.
    lost: AtomicUsize,
    /// Clients that failed before their planned hang-up (connect or request errors).
    errors: AtomicUsize,
}

/// The upstream side of one stream: a first chunk at once, the rest after `release`, then usage
/// and `[DONE]`. It stops as soon as the proxy drops the stream.
async fn feed(
    tx: tokio::sync::mpsc::Sender<Step>,
    mut release: watch::Receiver<bool>,
    alive: Arc<AtomicUsize>,
) {
    struct Alive(Arc<AtomicUsize>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _alive = Alive(alive);
    if tx.send(data(&chunk_event("soak", "first"))).await.is_err() {
        return;
    }
    tokio::select! {
        _ = release.wait_for(|go| *go) => {}
        _ = tx.closed() => return,
    }
    for i in 0..CHUNKS {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tx
            .send(data(&chunk_event("soak", &format!(" c{i}"))))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = tx.send(data(&usage_event("soak", 3, 9))).await;
    let _ = tx.send(data("data: [DONE]\n\n")).await;
}

async fn run_client(
    proxy: SocketAddr,
    kind: Client,
    release: watch::Receiver<bool>,
    tally: Arc<Tally>,
) {
    if let Err(error) = client(proxy, kind, release, &tally).await {
        tally.errors.fetch_add(1, Ordering::SeqCst);
        eprintln!("soak: {kind:?} client failed: {error}");
    }
}

/// One client on a connection of its own; returning drops the connection, so every early
/// return is a hang-up.
async fn client(
    proxy: SocketAddr,
    kind: Client,
    mut release: watch::Receiver<bool>,
    tally: &Tally,
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // Aborting the connection task closes the socket at once: a client that goes away.
    let connection = AbortOnDrop(tokio::spawn(connection));
    let request = Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("host", "proxy")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap();
    if kind == Client::Early {
        // Let the request leave, then hang up without waiting for the answer.
        let _ = tokio::time::timeout(Duration::from_millis(20), sender.send_request(request)).await;
        drop(connection);
        tally.gone.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .map_err(|_| "no response head in time".to_owned())?
        .map_err(|e| format!("request: {e:?}"))?;
    if response.status() != 200 {
        let status = response.status();
        let (_, _, body) = read_all(response).await;
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("first") {
        if !read(&mut body, &mut seen).await? {
            return Err(format!("the stream ended before its first chunk: {seen:?}"));
        }
    }
    tally.first_chunk.fetch_add(1, Ordering::SeqCst);
    if kind == Client::AfterFirst {
        drop(connection);
        tally.gone.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    release
        .wait_for(|go| *go)
        .await
        .map_err(|_| "release dropped")?;
    if let Client::Midway(after) = kind {
        while seen.matches(" c").count() < after {
            if !read(&mut body, &mut seen).await? {
                return Err("the stream ended early".to_owned());
            }
        }
        return Ok(());
    }
    let complete = loop {
        match read(&mut body, &mut seen).await {
            Ok(true) => {}
            Ok(false) => break true,
            Err(error) => {
                eprintln!("soak: full stream broke: {error}");
                break false;
            }
        }
    };
    let well_formed = complete
        && (0..CHUNKS).all(|i| seen.contains(&format!(" c{i}\"")))
        && seen.contains("\"completion_tokens\":9")
        && seen.ends_with("data: [DONE]\n\n")
        && !seen.contains("\"error\"");
    if well_formed {
        tally.complete.fetch_add(1, Ordering::SeqCst);
    } else {
        tally.lost.fetch_add(1, Ordering::SeqCst);
        eprintln!("soak: malformed stream: {seen:?}");
    }
    drop(sender);
    // A clean end: the connection task finishes by itself once the request is done.
    let _ = tokio::time::timeout(PATIENCE, connection.join()).await;
    Ok(())
}

/// Reads one frame into `seen`; `false` at the end of the body.
async fn read(body: &mut hyper::body::Incoming, seen: &mut String) -> Result<bool, String> {
    match tokio::time::timeout(PATIENCE, body.frame()).await {
        Err(_) => Err("no chunk in time".to_owned()),
        Ok(None) => Ok(false),
        Ok(Some(Err(e))) => Err(format!("body: {e}")),
        Ok(Some(Ok(frame))) => {
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
            Ok(true)
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Each stream holds four sockets in this process: client, proxy's accepted, proxy's upstream
/// and the mock's accepted one.
fn raise_open_file_limit(streams: u64) {
    let wanted = streams * 4 + 1024;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if soft >= wanted {
        return;
    }
    let hard = hard.max(wanted);
    if let Err(error) = rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, hard) {
        panic!(
            "{streams} streams need {wanted} open files, the limit is {soft} and cannot be raised \
             ({error}); lower SOAK_STREAMS or raise `ulimit -n`"
        );
    }
}

async fn active_requests(proxy: &TestProxy) -> f64 {
    proxy
        .metric("openrouter_active_requests")
        .await
        .expect("no openrouter_active_requests on /metrics")
}

/// Polls an async condition until it holds; `what` says what was awaited and the last value.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        match probe().await {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out waiting for {what}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// What one storm did.
struct Round {
    early: usize,
    after_first: usize,
    midway: usize,
    full: usize,
    complete: usize,
    lost: usize,
    seconds: f64,
    peak_tasks: usize,
    peak_rss: u64,
    upstream_at_peak: usize,
}

/// Everything a storm needs.
struct Bench<'a> {
    proxy: &'a TestProxy,
    upstream: &'a KillableUpstream,
    feeders: &'a AtomicUsize,
    release: &'a watch::Sender<bool>,
    baseline_active: f64,
}

/// `streams` clients at once, each behaving as the generator says; returns once every client
/// is done.
async fn storm(bench: &Bench<'_>, streams: u64, rng: &mut XorShift) -> Round {
    let metrics = tokio::runtime::Handle::current().metrics();
    let proxy = bench.proxy;
    bench.release.send_replace(false);
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let mut kinds = Vec::with_capacity(streams as usize);
    let mut clients = Vec::with_capacity(streams as usize);
    for _ in 0..streams {
        let kind = match rng.below(10) {
            0 => Client::Early,
            1 | 2 => Client::AfterFirst,
            3..=5 => Client::Midway(rng.below(CHUNKS as u64) as usize),
            _ => Client::Full,
        };
        kinds.push(kind);
        clients.push(tokio::spawn(run_client(
            proxy.addr,
            kind,
            bench.release.subscribe(),
            tally.clone(),
        )));
    }
    let count = |f: fn(&Client) -> bool| kinds.iter().filter(|k| f(k)).count();
    let early = count(|k| *k == Client::Early);
    let after_first = count(|k| *k == Client::AfterFirst);
    let held = kinds.len() - early - after_first;

    // Every held stream is open at once; the clients that hung up are gone upstream too.
    eventually(
        "every client's first chunk and every planned hang-up",
        || {
            let (first, gone, errors) = (
                tally.first_chunk.load(Ordering::SeqCst),
                tally.gone.load(Ordering::SeqCst),
                tally.errors.load(Ordering::SeqCst),
            );
            async move {
                assert_eq!(errors, 0, "clients failed before their planned hang-up");
                if first == held + after_first && gone == early + after_first {
                    Ok(())
                } else {
                    Err(format!("first chunks {first}, hang-ups {gone}"))
                }
            }
        },
    )
    .await;
    eventually(
        "upstream streams of departed clients to be cancelled",
        || {
            let alive = bench.feeders.load(Ordering::SeqCst);
            async move {
                if alive == held {
                    Ok(())
                } else {
                    Err(format!(
                        "{alive} upstream streams open, {held} clients hold one"
                    ))
                }
            }
        },
    )
    .await;
    eventually(
        "the active-request gauge to count the held streams",
        || async {
            let active = active_requests(proxy).await;
            if active == bench.baseline_active + held as f64 {
                Ok(())
            } else {
                Err(format!("{active} active"))
            }
        },
    )
    .await;
    let upstream_at_peak = bench.upstream.open_connections();
    assert!(
        upstream_at_peak >= held,
        "{upstream_at_peak} upstream connections for {held} streams"
    );
    let peak_tasks = metrics.num_alive_tasks();
    let peak_rss = rss_bytes();

    bench.release.send_replace(true);
    for client in clients {
        tokio::time::timeout(PATIENCE * 3, client)
            .await
            .expect("a client never finished")
            .unwrap();
    }
    assert_eq!(tally.errors.load(Ordering::SeqCst), 0);
    Round {
        early,
        after_first,
        midway: count(|k| matches!(k, Client::Midway(_))),
        full: count(|k| *k == Client::Full),
        complete: tally.complete.load(Ordering::SeqCst),
        lost: tally.lost.load(Ordering::SeqCst),
        seconds: started.elapsed().as_secs_f64(),
        peak_tasks,
        peak_rss,
        upstream_at_peak,
    }
}

/// Waits until streams, connections, the gauge and the tasks are back at the baseline.
async fn settle(bench: &Bench<'_>, baseline_tasks: usize) {
    let metrics = tokio::runtime::Handle::current().metrics();
    eventually("every upstream stream to end", || {
        let alive = bench.feeders.load(Ordering::SeqCst);
        async move {
            if alive == 0 {
                Ok(())
            } else {
                Err(format!("{alive} open"))
            }
        }
    })
    .await;
    eventually("every upstream connection to close", || {
        let open = bench.upstream.open_connections();
        async move {
            if open == 0 {
                Ok(())
            } else {
                Err(format!("{open} open"))
            }
        }
    })
    .await;
    eventually(
        "the active-request gauge to return to its baseline",
        || async {
            let active = active_requests(bench.proxy).await;
            if active == bench.baseline_active {
                Ok(())
            } else {
                Err(format!(
                    "{active} active, baseline {}",
                    bench.baseline_active
                ))
            }
        },
    )
    .await;
    eventually("the runtime's tasks to return to the baseline", || {
        let tasks = metrics.num_alive_tasks();
        async move {
            if tasks <= baseline_tasks {
                Ok(())
            } else {
                Err(format!("{tasks} tasks alive, baseline {baseline_tasks}"))
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_leave_nothing_behind() {
    let streams = env_number("SOAK_STREAMS", 1000);
    // Two storms size the allocator's heap for this load; the storms after them must not grow it.
    let warm_up = 2;
    let rounds = warm_up + env_number("SOAK_ROUNDS", 1).max(1);
    let seed = env_number("SOAK_SEED", 0x5eed_50a4);
    // 20 KiB per stream: 20 MiB at the default size. A leak of that much per stream shows up in
    // every storm, while the allocator's own growth shrinks from one storm to the next.
    let rss_slack = env_number("SOAK_RSS_SLACK_KIB_PER_STREAM", 20) * 1024 * streams;
    raise_open_file_limit(streams);
    let metrics = tokio::runtime::Handle::current().metrics();

    let (release, release_rx) = watch::channel(false);
    let feeders = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let feeders = feeders.clone();
        KillableUpstream::start(move |request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            if body["stream"] != true {
                return Reply::Json(200, chat_completion("soak", "warm"));
            }
            let (reply, tx, _closed) = stream_reply();
            feeders.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(feed(tx, release_rx.clone(), feeders.clone()));
            reply
        })
        .await
    };
    let proxy = TestProxy::start_for(
        &upstream.url(),
        &format!(
            "[server]\nmax_connections = {}\n[upstream]\npool_idle_timeout = \"300ms\"\n",
            streams * 2 + 100
        ),
    )
    .await;

    // Warm up once, so that what the pool and the runtime create on first use is part of the
    // baseline, then wait for every connection to close.
    for _ in 0..3 {
        let (status, _, _) = post_json(
            &proxy.url("/v1/chat/completions"),
            r#"{"model":"soak","messages":[]}"#,
            &[],
        )
        .await;
        assert_eq!(status, 200);
    }
    wait_until("idle upstream connections to close", || {
        upstream.open_connections() == 0
    })
    .await;
    let baseline_tasks = metrics.num_alive_tasks();
    let baseline_rss = rss_bytes();
    let bench = Bench {
        proxy: &proxy,
        upstream: &upstream,
        feeders: &feeders,
        release: &release,
        baseline_active: active_requests(&proxy).await,
    };

    let mut rng = XorShift::new(seed);
    let mut warm_rss = 0;
    let mut lost = 0;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    for round in 1..=rounds {
        let r = storm(&bench, streams, &mut rng).await;
        settle(&bench, baseline_tasks).await;
        if round == warm_up {
            warm_rss = rss_bytes();
        }
        if round > warm_up {
            let rss = rss_bytes();
            assert!(
                rss <= warm_rss + rss_slack,
                "round {round}: resident memory grew from {:.1} MiB after the warm-up storms \
                 to {:.1} MiB",
                mib(warm_rss),
                mib(rss)
            );
        }
        println!(
            "soak: round={round} streams={streams} seed={seed:#x} early={} after_first={} \
             midway={} full={} complete={} lost={} seconds={:.2} tasks={baseline_tasks}/{}/{} \
             rss_mib={:.1}/{:.1}/{:.1} upstream_conns_at_peak={}",
            r.early,
            r.after_first,
            r.midway,
            r.full,
            r.complete,
            r.lost,
            r.seconds,
            r.peak_tasks,
            metrics.num_alive_tasks(),
            mib(baseline_rss),
            mib(r.peak_rss),
            mib(rss_bytes()),
            r.upstream_at_peak,
        );
        assert_eq!(r.complete + r.lost, r.full);
        lost += r.lost;
    }
    assert_eq!(lost, 0, "streams read to the end came back broken");
    proxy.stop().await.unwrap();
}
