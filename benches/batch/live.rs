//! Live latency while a batch runs: the real proxy (`openrouter_proxy::serve`, its listener, the
//! Batch API on its SQLite store, batch work yielding above the default `yield_above = 64`) is
//! served on 127.0.0.1:0 on its own one-thread runtime, as the binary runs by default. Live chat
//! requests, from one client or several each sending one at a time, go either straight to the
//! mock or through the proxy, with no batch, or while one batch of `lines` runs through the same
//! proxy against the same mock. Each latency is a full round trip, answer body read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const LIVE_BODY: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"a live question, answered now"}]}"#;

/// Live requests sent before each measured phase, to open the connections.
const WARM_UP: usize = 200;

/// The proxy served in-process with `[batch] concurrency`; dropping it does not stop it.
pub struct Proxy {
    pub addr: SocketAddr,
    store: PathBuf,
    shutdown: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Proxy {
    pub fn start(mock: SocketAddr, concurrency: usize) -> Proxy {
        let tag = format!("{}-{concurrency}", std::process::id());
        let store = std::env::temp_dir().join(format!("batch-bench-live-{tag}"));
        let _ = std::fs::remove_dir_all(&store);
        let key = std::env::temp_dir().join(format!("batch-bench-live-key-{tag}"));
        std::fs::write(&key, "sk-bench").unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             drain_delay = \"0s\"\nshutdown_grace = \"1s\"\n\
             [upstream]\nbase_url = \"http://{mock}/v1\"\napi_key_file = \"{}\"\n\
             [batch]\nstore = \"{}\"\nconcurrency = {concurrency}\n",
            key.display(),
            store.display()
        );
        let config = openrouter_proxy::Config::parse(&text).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            // One thread serves the proxy by default (`server.worker_threads = 1`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let api = TcpListener::bind(config.server.listen).await.unwrap();
                let admin = TcpListener::bind(config.server.admin_listen).await.unwrap();
                addr_tx.send(api.local_addr().unwrap()).unwrap();
                let listeners = openrouter_proxy::Listeners { api, admin };
                openrouter_proxy::serve(config, listeners, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        Proxy {
            addr: addr_rx.recv().unwrap(),
            store,
            shutdown,
            thread,
        }
    }

    /// Stops the proxy, waits for its thread and removes its store.
    pub fn stop(self) {
        let _ = self.shutdown.send(());
        self.thread.join().unwrap();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

async fn call(client: &HttpClient, method: &str, url: String, body: Bytes) -> serde_json::Value {
    let content_type = if url.ends_with("/v1/files") {
        "multipart/form-data; boundary=b"
    } else {
        "application/json"
    };
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .body(Full::new(body))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(status.is_success(), "{status}: {body:?}");
    serde_json::from_slice(&body).unwrap()
}

/// One live chat request to `url`; its round trip, answer read.
async fn live_request(client: &HttpClient, url: &str) -> Duration {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(LIVE_BODY.as_bytes())))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    assert!(status.is_success(), "live request answered {status}");
    started.elapsed()
}

/// `clients` live clients, each sending one request at a time to `url` until `stop` is set;
/// returns every round trip.
async fn live_until(
    client: &HttpClient,
    url: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (client, url, stop) = (client.clone(), url.to_owned(), stop.clone());
        tasks.spawn(async move {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                took.push(live_request(&client, &url).await);
            }
            took
        });
    }
    let mut all = Vec::new();
    while let Some(took) = tasks.join_next().await {
        all.extend(took.unwrap());
    }
    all
}

async fn warm_up(client: &HttpClient, url: &str) {
    for _ in 0..WARM_UP {
        live_request(client, url).await;
    }
}

/// Live round trips to `url` for `seconds`, with no batch running.
pub async fn without_batch(
    client: &HttpClient,
    url: &str,
    clients: usize,
    seconds: f64,
) -> Vec<Duration> {
    warm_up(client, url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let timer = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        timer.store(true, Ordering::Relaxed);
    });
    live_until(client, url, clients, stop).await
}

/// Live round trips to `url` while one batch of the `input` runs through `proxy`, from its
/// creation to its completion.
pub async fn during_batch(
    client: &HttpClient,
    proxy: &Proxy,
    input: Bytes,
    url: &str,
    clients: usize,
) -> Vec<Duration> {
    let base = format!("http://{}", proxy.addr);
    let file = call(client, "POST", format!("{base}/v1/files"), input).await;
    warm_up(client, url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let live = live_until(client, url, clients, stop.clone());
    let create = serde_json::json!({
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    });
    let follow = async {
        let batch = call(
            client,
            "POST",
            format!("{base}/v1/batches"),
            create.to_string().into(),
        );
        let id = batch.await["id"].as_str().unwrap().to_owned();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let batch = call(
                client,
                "GET",
                format!("{base}/v1/batches/{id}"),
                Bytes::new(),
            )
            .await;
            assert!(batch["status"] != "failed", "{batch}");
            if batch["status"] == "completed" {
                assert_eq!(batch["request_counts"]["failed"], 0, "{batch}");
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
    };
    let (took, ()) = tokio::join!(live, follow);
    took
}

/// The `q` quantile of `took` in microseconds (nearest rank).
pub fn quantile(took: &mut [Duration], q: f64) -> f64 {
    took.sort_unstable();
    let rank = ((took.len() as f64 * q).ceil() as usize).clamp(1, took.len());
    took[rank - 1].as_secs_f64() * 1e6
}

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Prints the live latency table: for each number of live clients, with no batch and while a
/// batch runs at each concurrency, live requests straight to the mock and through the proxy.
pub fn table(mock: SocketAddr, input: &Bytes, clients: &[usize], batches: &[usize], secs: f64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = client();
    let direct = format!("http://{mock}/v1/chat/completions");
    println!(
        "| live clients | batch running | requests direct / proxied | p50 direct | p50 proxied | added p50 | p99 direct | p99 proxied | added p99 |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &live in clients {
        let mut rows = Vec::new();
        let idle = Proxy::start(mock, batches.first().copied().unwrap_or(8));
        let proxied = format!("http://{}/v1/chat/completions", idle.addr);
        let pair = runtime.block_on(async {
            let d = without_batch(&client, &direct, live, secs).await;
            let p = without_batch(&client, &proxied, live, secs).await;
            (d, p)
        });
        idle.stop();
        rows.push(("none".to_owned(), pair));
        for &concurrency in batches {
            let run = |through_proxy: bool| {
                let proxy = Proxy::start(mock, concurrency);
                let proxied = format!("http://{}/v1/chat/completions", proxy.addr);
                let url = if through_proxy { &proxied } else { &direct };
                let took =
                    runtime.block_on(during_batch(&client, &proxy, input.clone(), url, live));
                proxy.stop();
                took
            };
            let pair = (run(false), run(true));
            rows.push((format!("concurrency {concurrency}"), pair));
        }
        for (batch, (mut d, mut p)) in rows {
            let (d50, p50) = (quantile(&mut d, 0.5), quantile(&mut p, 0.5));
            let (d99, p99) = (quantile(&mut d, 0.99), quantile(&mut p, 0.99));
            println!(
                "| {live} | {batch} | {} / {} | {d50:.0} µs | {p50:.0} µs | {:+.0} µs | {d99:.0} µs | {p99:.0} µs | {:+.0} µs |",
                d.len(),
                p.len(),
                p50 - d50,
                p99 - d99
            );
        }
    }
}
