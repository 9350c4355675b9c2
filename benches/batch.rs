//! Batch throughput: lines per second for one batch of 10,000 chat lines run by the batch
//! service (embedded store, workers, output file) against a fast mock upstream on loopback, at
//! several concurrencies; prints a markdown table. Each concurrency runs twice in one run: lines
//! sent straight to the mock (`direct`), and lines run through the proxy's pipeline as the
//! running proxy runs them (`proxy`: routing, key injection, the upstream client, the access
//! log), so the proxy's share is a ratio from one run.
//!
//! A second table measures live requests while a batch runs (see `batch/live.rs`): their p50 and
//! p99 straight to the mock and through the real proxy, with no batch and during a batch at each
//! concurrency, and the latency the proxy adds in each case.
//!
//! Run it with `cargo bench --bench batch` (`-- --lines N --concurrency A,B --live-clients C,D
//! --live-seconds S --tables throughput,live` to change the run). Under `cargo test` it does
//! nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly on set-up errors"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use openrouter_proxy::batch::{
    BatchService, LineExecutor, LineFuture, LineOutcome, LineRequest, LineResponse, SqliteStore,
    SystemClock,
};
use openrouter_proxy::config::BatchConfig;
use openrouter_proxy::pipeline::line::{CallerKeys, PipelineLines};
use openrouter_proxy::pipeline::Shared;
use tokio::net::TcpListener;

#[path = "batch/live.rs"]
mod live;

const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"a short answer of a few words"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}"#;

/// A mock upstream on its own thread that answers every request with [`ANSWER`].
fn start_mock() -> SocketAddr {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let answer = service_fn(|_request| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            ANSWER.as_bytes(),
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), answer)
                        .await;
                });
            }
        });
    });
    addr_rx.recv().unwrap()
}

/// Sends each line to the mock over pooled HTTP/1.1 connections, as the proxy's pipeline would.
struct Forward {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl LineExecutor for Forward {
    fn execute(&self, line: LineRequest) -> LineFuture {
        let request = Request::post(format!("{}{}", self.base, line.path))
            .header("content-type", "application/json")
            .body(Full::new(line.body))
            .unwrap();
        let client = self.client.clone();
        Box::pin(async move {
            match client.request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    LineOutcome::Answered(LineResponse {
                        status,
                        body,
                        request_id: String::new(),
                        retry_after: None,
                    })
                }
                Err(error) => LineOutcome::Unreachable(error.to_string()),
            }
        })
    }
}

fn input(lines: usize) -> Bytes {
    let mut text = String::new();
    for i in 0..lines {
        text.push_str(&format!(
            r#"{{"custom_id":"line-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[{{"role":"user","content":"question number {i}"}}]}}}}"#
        ));
        text.push('\n');
    }
    let mut body =
        String::from("--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n");
    body.push_str(
        "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n",
    );
    body.push_str(&text);
    body.push_str("\r\n--b--\r\n");
    Bytes::from(body)
}

async fn call(service: &BatchService, method: &str, path: &str, body: Bytes) -> serde_json::Value {
    let content_type = if path == "/v1/files" {
        "multipart/form-data; boundary=b"
    } else {
        "application/json"
    };
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(Full::new(body))
        .unwrap();
    let response = service.handle("bench", request).await;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// How lines reach the mock.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Proxy,
}

/// The executor for `path`: a plain client, or the proxy's pipeline configured for the mock.
fn executor(mock: SocketAddr, path: Path) -> Arc<dyn LineExecutor> {
    if path == Path::Direct {
        return Arc::new(Forward {
            base: format!("http://{mock}"),
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        });
    }
    let key = std::env::temp_dir().join(format!("batch-bench-key-{}", std::process::id()));
    std::fs::write(&key, "sk-bench").unwrap();
    let text = format!(
        "[upstream]\nbase_url = \"http://{mock}/v1\"\napi_key_file = \"{}\"\n",
        key.display()
    );
    let config = openrouter_proxy::Config::parse(&text).unwrap();
    let runtime = openrouter_proxy::runtime::Runtime::build(config, None).unwrap();
    let shared = Arc::new(Shared::new(runtime).unwrap());
    Arc::new(PipelineLines::new(shared, Arc::new(CallerKeys::default())))
}

/// Runs one batch of `lines` at `concurrency`; returns the seconds from creation to completion.
async fn run(mock: SocketAddr, path: Path, lines: usize, concurrency: usize) -> f64 {
    let store =
        std::env::temp_dir().join(format!("batch-bench-{}-{concurrency}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let config = BatchConfig {
        store: store.clone(),
        concurrency,
        ..BatchConfig::default()
    };
    let service = BatchService::start(
        config.clone(),
        Arc::new(SqliteStore::open(&config.store).unwrap()),
        executor(mock, path),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(SystemClock),
    );
    let file = call(&service, "POST", "/v1/files", input(lines)).await;
    let create = serde_json::json!({
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    });
    let started = Instant::now();
    let batch = call(&service, "POST", "/v1/batches", create.to_string().into()).await;
    let path = format!("/v1/batches/{}", batch["id"].as_str().unwrap());
    loop {
        let batch = call(&service, "GET", &path, Bytes::new()).await;
        if batch["status"] == "completed" {
            assert_eq!(batch["request_counts"]["completed"], lines);
            break;
        }
        assert!(batch["status"] != "failed", "{batch}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    service.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&store);
    seconds
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

/// A comma-separated list of numbers after `name`, or `default`.
fn list(args: &[String], name: &str, default: &str) -> Vec<usize> {
    flag::<String>(args, name)
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("batch: skipped outside `cargo bench`");
        return;
    }
    let lines: usize = flag(&args, "--lines").unwrap_or(10_000);
    let concurrencies = list(&args, "--concurrency", "8,64");
    let tables: String = flag(&args, "--tables").unwrap_or_else(|| "throughput,live".to_owned());
    let live_clients: Vec<usize> = list(&args, "--live-clients", "1,8");
    let live_seconds: f64 = flag(&args, "--live-seconds").unwrap_or(3.0);
    let mock = start_mock();
    // The running proxy writes an access-log line per batch line: so does this one, to nowhere.
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter("info")
        .with_writer(std::io::sink)
        .init();
    // One thread serves the proxy by default (`server.worker_threads = 1`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if tables.contains("throughput") {
        throughput(&runtime, mock, lines, &concurrencies);
        println!();
    }
    if tables.contains("live") {
        live::table(
            mock,
            &input(lines),
            &live_clients,
            &concurrencies,
            live_seconds,
        );
    }
}

/// Prints the throughput table: lines/s direct and through the proxy at each concurrency.
fn throughput(
    runtime: &tokio::runtime::Runtime,
    mock: SocketAddr,
    lines: usize,
    concurrencies: &[usize],
) {
    println!(
        "| concurrency | lines | lines/s direct | lines/s through the proxy | proxy / direct |\n|---:|---:|---:|---:|---:|"
    );
    for &concurrency in concurrencies {
        let direct = runtime.block_on(run(mock, Path::Direct, lines, concurrency));
        let proxied = runtime.block_on(run(mock, Path::Proxy, lines, concurrency));
        let (direct, proxied) = (lines as f64 / direct, lines as f64 / proxied);
        println!(
            "| {concurrency} | {lines} | {direct:.0} | {proxied:.0} | {:.2} |",
            proxied / direct
        );
    }
}
