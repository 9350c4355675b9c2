//! Batch API test support: the batch service behind a small hyper server on 127.0.0.1:0 (the
//! caller's bearer token is its owner), a `LineExecutor` that forwards lines over HTTP to a
//! `MockUpstream`, a clock the test moves forward, gates that hold the mock's answers, and the
//! official Python SDK client of `tests/sdk/batch_python.py`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use openrouter_proxy::batch::{
    BatchService, Clock, LineExecutor, LineFuture, LineOutcome, LineRequest, LineResponse,
    SqliteStore,
};
use openrouter_proxy::config::BatchConfig;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::{client, python, read_all, root, send, Recorded, Reply, TestClient, PATIENCE};

/// Sends each line to the mock upstream as `POST <mock>/api/v1/<endpoint>`, naming the line in
/// `x-custom-id` so that the mock can script and record answers per line.
pub struct LineForwarder {
    base: String,
    client: TestClient,
}

impl LineExecutor for LineForwarder {
    fn execute(&self, line: LineRequest) -> LineFuture {
        let path = line.path.strip_prefix("/v1").unwrap_or(&line.path);
        let request = Request::post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .header("x-custom-id", &line.custom_id)
            .header("x-batch-id", &line.batch_id)
            .body(Full::new(line.body))
            .unwrap();
        let client = self.client.clone();
        Box::pin(async move {
            let response = match client.request(request).await {
                Ok(response) => response,
                Err(error) => return LineOutcome::Unreachable(error.to_string()),
            };
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let request_id = header("x-request-id").unwrap_or_default();
            let retry_after = header("retry-after")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs);
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Ok(body) => LineOutcome::Answered(LineResponse {
                    status,
                    body: body.to_bytes(),
                    request_id,
                    retry_after,
                }),
                Err(error) => LineOutcome::Unreachable(error.to_string()),
            }
        })
    }
}

/// The wall clock plus an offset the test moves forward (to a batch's expiry, past retention).
#[derive(Default)]
pub struct OffsetClock(Mutex<Duration>);

impl OffsetClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.0.lock().unwrap()
    }
}

/// A fresh, empty store directory under the target directory.
pub fn store_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "batch-store-{}",
        openrouter_proxy::batch::model::new_id("")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The defaults, on `store`, with a 50 ms retry base so that backoff is visible but quick.
pub fn batch_config(store: &Path) -> BatchConfig {
    BatchConfig {
        store: store.to_owned(),
        retry_base: Duration::from_millis(50),
        ..BatchConfig::default()
    }
}

/// [`batch_config`] on a fresh store, with `concurrency` lines in flight.
pub fn config_with(concurrency: usize) -> BatchConfig {
    BatchConfig {
        concurrency,
        ..batch_config(&store_dir())
    }
}

/// The batch service on its own embedded store, served on 127.0.0.1:0.
pub struct BatchServer {
    pub addr: std::net::SocketAddr,
    pub service: Arc<BatchService>,
    pub clock: Arc<OffsetClock>,
    /// The live in-flight count the service yields to.
    pub live: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl BatchServer {
    pub async fn start(config: BatchConfig, upstream: &super::MockUpstream) -> BatchServer {
        let store = SqliteStore::open(&config.store).unwrap();
        let executor = LineForwarder {
            base: upstream.url(),
            client: client(),
        };
        let (clock, live) = (Arc::new(OffsetClock::default()), Arc::default());
        let service = Arc::new(BatchService::start(
            config,
            Arc::new(store),
            Arc::new(executor),
            Arc::clone(&live),
            clock.clone(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(serve(listener, service.clone()));
        BatchServer {
            addr,
            service,
            clock,
            live,
            accept,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops serving and shuts the service down at once: lines in flight are abandoned, as if
    /// the process had been killed, and the store is released.
    pub async fn stop(self) {
        self.accept.abort();
        let _ = self.accept.await;
        self.service.shutdown(Duration::ZERO).await;
    }

    /// GETs a Batch API path as `owner`: status and JSON body.
    pub async fn get(&self, owner: &str, path: &str) -> (u16, Value) {
        let auth = format!("Bearer {owner}");
        let response = send("GET", &self.url(path), &[("authorization", &auth)], "").await;
        let (status, _, body) = read_all(response).await;
        (status.as_u16(), serde_json::from_slice(&body).unwrap())
    }

    /// The newest batch of `owner`, as the API shows it.
    pub async fn newest_batch(&self, owner: &str) -> Option<Value> {
        let (_, list) = self.get(owner, "/v1/batches?limit=1").await;
        list["data"].get(0).cloned()
    }
}

async fn serve(listener: TcpListener, service: Arc<BatchService>) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let service = service.clone();
        connections.spawn(async move {
            let answer = service_fn(move |request: Request<Incoming>| {
                let service = service.clone();
                async move {
                    let owner = request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or_default()
                        .to_owned();
                    Ok::<_, Infallible>(service.handle(&owner, request).await)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), answer)
                .await;
        });
    }
}

/// Runs `tests/sdk/batch_python.py` with `args` as the caller `owner` and returns the JSON it
/// printed; fails the test with the client's output unless it succeeds.
pub async fn python_batch(server: &BatchServer, owner: &str, args: &[&str]) -> Value {
    // Tests run in parallel; a few interpreters at a time start faster than all at once on a
    // loaded machine.
    static CLIENTS: Semaphore = Semaphore::const_new(2);
    let _turn = CLIENTS.acquire().await.unwrap();
    let mut client = tokio::process::Command::new(python());
    client
        .arg(root().join("tests/sdk/batch_python.py"))
        .args(args)
        .env("OPENAI_BASE_URL", server.url("/v1"))
        .env("OPENAI_API_KEY", owner);
    super::client_json(client, PATIENCE * 6).await
}

/// One input line for `/v1/chat/completions`.
pub fn chat_line(custom_id: &str, content: &str) -> String {
    serde_json::json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "stream": true, "messages": [{"role": "user", "content": content}]},
    })
    .to_string()
}

/// `count` chat lines with custom ids `prefix-1` ... `prefix-<count>`.
pub fn numbered_lines(prefix: &str, count: usize) -> Vec<String> {
    (1..=count)
        .map(|i| chat_line(&format!("{prefix}-{i}"), &format!("question {i}")))
        .collect()
}

/// The number at the end of a custom id such as `line-12`.
pub fn line_number(custom_id: &str) -> usize {
    custom_id.rsplit('-').next().unwrap().parse().unwrap()
}

/// A mock that answers lines 1 to `answered` at once and holds the others until the gates are
/// released.
pub async fn upstream_holding_after(answered: usize) -> (super::MockUpstream, Gates) {
    let gates = Gates::default();
    let held = gates.clone();
    let upstream = super::MockUpstream::start(move |request| {
        let id = custom_id(request);
        if line_number(&id) <= answered {
            answer_for(&id)
        } else {
            held.hold(answer_for(&id))
        }
    })
    .await;
    (upstream, gates)
}

/// Uploads `lines` and creates a batch of them through the SDK: `(batch id, file id)`.
pub async fn create_batch(server: &BatchServer, owner: &str, lines: &[String]) -> (String, String) {
    let input = input_file(lines);
    let created = python_batch(server, owner, &["create", input.to_str().unwrap()]).await;
    let id = |key: &str| created[key].as_str().unwrap().to_owned();
    (id("batch_id"), id("file_id"))
}

/// Writes JSONL input lines to a fresh file.
pub fn input_file(lines: &[String]) -> PathBuf {
    let path = store_dir().join("input.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The `x-custom-id` a forwarded line carries.
pub fn custom_id(request: &Recorded) -> String {
    request.header("x-custom-id").unwrap_or_default().to_owned()
}

/// A chat completion answering `custom_id`, so that outputs can be matched to their lines.
pub fn answer_for(custom_id: &str) -> Reply {
    Reply::Json(
        200,
        super::chat_completion("m", &format!("answer to {custom_id}")),
    )
}

/// Holds answers of the mock until the test releases them.
#[derive(Clone, Default)]
pub struct Gates(Arc<Mutex<Vec<oneshot::Sender<()>>>>);

impl Gates {
    pub fn hold(&self, reply: Reply) -> Reply {
        let (open, gate) = oneshot::channel();
        self.0.lock().unwrap().push(open);
        Reply::Gated(gate, Box::new(reply))
    }

    pub fn release(&self) {
        for open in self.0.lock().unwrap().drain(..) {
            let _ = open.send(());
        }
    }
}

/// The JSON lines of an output or error file (none for a file that does not exist).
pub fn jsonl(text: &Value) -> Vec<Value> {
    text.as_str()
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The `custom_id`s of output or error file lines, sorted.
pub fn custom_ids(lines: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = lines
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Custom ids `prefix-1` ... `prefix-n`, sorted as strings.
pub fn numbered(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    let mut ids: Vec<String> = range.map(|i| format!("{prefix}-{i}")).collect();
    ids.sort();
    ids
}

/// Polls the newest batch of `owner` until `condition` holds for it.
pub async fn wait_for_batch(
    server: &BatchServer,
    owner: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(batch) = server.newest_batch(owner).await {
            if condition(&batch) {
                return batch;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch never reached the expected state"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
