//! Test support: a scripted mock upstream on 127.0.0.1:0 (speaking every API shape, see `shapes`),
//! the real proxy booted in-process on port 0 against it, a small HTTP client, and the official
//! SDKs' clients run against the proxy.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on set-up errors"
)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};

pub mod batch;
pub mod batch_proxy;
pub mod otlp;
pub mod redis;
mod requests;
#[allow(unused_imports, reason = "only some test binaries use these helpers")]
pub use requests::*;
pub mod replicas;
mod shapes;
pub use shapes::*;
mod upstreams;
#[allow(unused_imports, reason = "only some test binaries use these helpers")]
pub use upstreams::*;

/// Generous bound for waits that succeed in milliseconds unless something is broken; it only
/// turns a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A request as the mock upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// Reads a request whole, as the mock received it.
    async fn read(request: Request<Incoming>) -> Recorded {
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Recorded {
            method: parts.method,
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: parts.headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// One piece of a scripted streaming answer.
pub enum Step {
    Data(Bytes),
    /// Abort the connection mid-body.
    Cut,
}

/// What the mock answers.
pub enum Reply {
    Json(u16, String),
    /// An SSE answer written at once.
    Sse(Vec<String>),
    /// An SSE answer whose pieces the test sends one by one; dropping the sender ends the body.
    Stream(mpsc::Receiver<Step>, Option<oneshot::Sender<()>>),
    /// The answer after a pause (for first-byte timeouts).
    After(Duration, Box<Reply>),
    /// Never answer.
    Hang,
    /// Close the connection without answering.
    Close,
    /// Another reply with extra response headers.
    Headers(Vec<(&'static str, &'static str)>, Box<Reply>),
    /// Another reply, sent once the test fires the signal.
    Gated(oneshot::Receiver<()>, Box<Reply>),
    /// Any status, headers and body bytes, exactly as given (a compressed body, an empty one).
    Raw(u16, Vec<(&'static str, &'static str)>, Bytes),
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

struct MockState {
    handler: Box<Handler>,
    requests: Mutex<Vec<Recorded>>,
    arrived: Notify,
    scripted: Mutex<VecDeque<Reply>>,
}

/// A scripted upstream on 127.0.0.1:0 that records what it receives.
#[derive(Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
}

impl MockUpstream {
    /// Answers every request with `handler`, unless replies were queued with [`push`].
    pub async fn start(
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState {
            handler: Box::new(handler),
            requests: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            scripted: Mutex::new(VecDeque::new()),
        });
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockUpstream { addr, state }
    }

    /// A mock that answers chat completions like OpenRouter does, echoing the model it was sent.
    pub async fn openai_like() -> MockUpstream {
        MockUpstream::start(openai_like_reply).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    /// Queues a reply for the next request, ahead of the handler.
    pub fn push(&self, reply: Reply) {
        self.state.scripted.lock().unwrap().push_back(reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_requests(&self, n: usize) -> Vec<Recorded> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let notified = self.state.arrived.notified();
                if self.request_count() >= n {
                    return self.requests();
                }
                notified.await;
            }
        })
        .await
        .expect("the upstream never received the expected requests")
    }
}

async fn answer(
    state: Arc<MockState>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, std::io::Error> {
    let recorded = Recorded::read(request).await;
    let scripted = state.scripted.lock().unwrap().pop_front();
    let reply = scripted.unwrap_or_else(|| (state.handler)(&recorded));
    state.requests.lock().unwrap().push(recorded);
    state.arrived.notify_waiters();
    reply_or_close(reply).await
}

/// A service error makes hyper close the connection without writing a response.
async fn reply_or_close(reply: Reply) -> Result<Response<MockBody>, std::io::Error> {
    render(reply)
        .await
        .ok_or_else(|| std::io::Error::other("scripted close"))
}

/// `None` closes the connection without an answer.
fn render(
    reply: Reply,
) -> Pin<Box<dyn std::future::Future<Output = Option<Response<MockBody>>> + Send>> {
    Box::pin(async move {
        Some(match reply {
            Reply::Json(status, body) => {
                let mut response = Response::new(MockBody::Full(Some(Bytes::from(body))));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                response
            }
            Reply::Sse(events) => sse_response(MockBody::Full(Some(Bytes::from(events.concat())))),
            Reply::Stream(rx, closed) => sse_response(MockBody::Stream(rx, closed)),
            Reply::After(pause, reply) => {
                tokio::time::sleep(pause).await;
                return render(*reply).await;
            }
            Reply::Hang => std::future::pending().await,
            Reply::Close => return None,
            Reply::Gated(gate, reply) => {
                let _ = gate.await;
                return render(*reply).await;
            }
            Reply::Raw(status, headers, body) => {
                let mut response = Response::new(MockBody::Full(Some(body)));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                for (name, value) in headers {
                    response.headers_mut().insert(name, value.parse().unwrap());
                }
                response
            }
            Reply::Headers(headers, reply) => {
                let mut response = render(*reply).await?;
                for (name, value) in headers {
                    response.headers_mut().insert(name, value.parse().unwrap());
                }
                response
            }
        })
    })
}

fn sse_response(body: MockBody) -> Response<MockBody> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
        .headers_mut()
        .insert("cache-control", "no-cache".parse().unwrap());
    response
}

/// The mock's response body. A stream tells its test when it is dropped, which is how the test
/// sees the proxy cancel the upstream request.
pub enum MockBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Step>, Option<oneshot::Sender<()>>),
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if let MockBody::Stream(_, closed) = self {
            if let Some(closed) = closed.take() {
                let _ = closed.send(());
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(rx, _) => match rx.poll_recv(cx) {
                Poll::Ready(Some(Step::Data(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Poll::Ready(Some(Step::Cut)) => {
                    Poll::Ready(Some(Err(std::io::Error::other("scripted cut"))))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// A controllable SSE answer: `(reply, sender, closed)`. Send `Step`s through `sender`; `closed`
/// fires when the proxy drops the upstream response.
pub fn stream_reply() -> (Reply, mpsc::Sender<Step>, oneshot::Receiver<()>) {
    let (tx, rx) = mpsc::channel(16);
    let (closed_tx, closed_rx) = oneshot::channel();
    (Reply::Stream(rx, Some(closed_tx)), tx, closed_rx)
}

/// An OpenAI-like mock whose first answer is a controllable stream (see [`stream_reply`]).
pub async fn upstream_with_stream() -> (MockUpstream, mpsc::Sender<Step>, oneshot::Receiver<()>) {
    let (reply, tx, closed) = stream_reply();
    let upstream = MockUpstream::start(openai_like_reply).await;
    upstream.push(reply);
    (upstream, tx, closed)
}

pub fn data(text: &str) -> Step {
    Step::Data(Bytes::from(text.to_owned()))
}

/// An OpenAI chat-completion chunk event carrying `content`.
pub fn chunk_event(model: &str, content: &str) -> String {
    let chunk = serde_json::json!({
        "id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}]
    });
    format!("data: {chunk}\n\n")
}

pub fn usage_event(model: &str, prompt: u64, completion: u64) -> String {
    let chunk = serde_json::json!({
        "id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion, "cost": 0.00042}
    });
    format!("data: {chunk}\n\n")
}

pub fn chat_completion(model: &str, content: &str) -> String {
    serde_json::json!({
        "id": "gen-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "cost": 0.0001}
    })
    .to_string()
}

/// OpenRouter-like answers: chat (JSON or SSE, with a processing comment and a usage chunk when
/// asked), completions, embeddings, the model list, Anthropic Messages and the Responses API.
pub fn openai_like_reply(request: &Recorded) -> Reply {
    let path = request.path_and_query.split('?').next().unwrap_or("");
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let model = body["model"].as_str().unwrap_or("none").to_owned();
    match path {
        "/api/v1/chat/completions" if body["stream"] == true => {
            let mut events = vec![": OPENROUTER PROCESSING\n\n".to_owned()];
            for word in ["Hello", " from", " the", " mock"] {
                events.push(chunk_event(&model, word));
            }
            let done = serde_json::json!({
                "id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
            });
            events.push(format!("data: {done}\n\n"));
            if body["stream_options"]["include_usage"] == true {
                events.push(usage_event(&model, 7, 4));
            }
            events.push("data: [DONE]\n\n".to_owned());
            Reply::Sse(events)
        }
        "/api/v1/chat/completions" => Reply::Json(200, chat_completion(&model, "Hello from the mock")),
        "/api/v1/completions" => Reply::Json(
            200,
            serde_json::json!({
                "id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
                "choices": [{"index": 0, "text": "completed", "finish_reason": "stop", "logprobs": null}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
            })
            .to_string(),
        ),
        "/api/v1/embeddings" => Reply::Json(
            200,
            serde_json::json!({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
                "usage": {"prompt_tokens": 2, "total_tokens": 2}
            })
            .to_string(),
        ),
        "/api/v1/models" => Reply::Json(
            200,
            serde_json::json!({
                "object": "list",
                "data": [
                    {"id": "openai/gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"},
                    {"id": "anthropic/claude-3.5-haiku", "object": "model", "created": 1, "owned_by": "anthropic"}
                ]
            })
            .to_string(),
        ),
        _ => shape_reply(request).unwrap_or_else(|| {
            Reply::Json(404, r#"{"error":{"message":"no such path","code":404}}"#.to_owned())
        }),
    }
}

static NEXT_FILE: AtomicUsize = AtomicUsize::new(0);

/// Writes `contents` to a fresh file under the target directory and returns its path.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "t{}-{}",
        std::process::id(),
        NEXT_FILE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

pub const TEST_KEY: &str = "sk-or-test-0123456789abcdef";

/// A config file for the real binary: both listeners on free ports, the upstream at `base_url`
/// with the test key read from a file, and `extra` laid over it table by table.
pub fn proxy_config_file(base_url: &str, extra: &str) -> PathBuf {
    let key = temp_file("key", TEST_KEY);
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{base_url}\"\napi_key_file = \"{}\"\n",
        key.display()
    );
    temp_file("proxy.toml", &merge_toml(&base, extra))
}

/// The proxy, running in-process on 127.0.0.1:0.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl TestProxy {
    /// Boots the proxy with `extra` config merged over a base that points at `upstream`, listens
    /// on port 0, reads the test key from a file, and drains without delay.
    pub async fn start(upstream: &MockUpstream, extra: &str) -> TestProxy {
        let key_file = temp_file("api-key", &format!("{TEST_KEY}\n"));
        let base = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\
             [upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
            upstream.url(),
            key_file.display()
        );
        TestProxy::start_with_config(&merge_toml(&base, extra)).await
    }

    pub async fn start_with_config(text: &str) -> TestProxy {
        let config = openrouter_proxy::Config::parse(text).unwrap();
        let api = TcpListener::bind(config.server.listen).await.unwrap();
        let admin = TcpListener::bind(config.server.admin_listen).await.unwrap();
        let addr = api.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(openrouter_proxy::serve(
            config,
            openrouter_proxy::Listeners { api, admin },
            async move {
                let _ = rx.await;
            },
        ));
        TestProxy {
            addr,
            admin: admin_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Starts the graceful shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends a request and returns the response with its body still unread.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    tokio::time::timeout(PATIENCE, client().request(request))
        .await
        .expect("the proxy did not answer in time")
        .unwrap()
}

/// POSTs JSON and returns status, headers and the whole body.
pub async fn post_json(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let response = send("POST", url, &all, body.to_owned()).await;
    read_all(response).await
}

pub async fn read_all(response: Response<Incoming>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = response.into_parts();
    let bytes = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the body did not end in time")
        .unwrap()
        .to_bytes();
    (parts.status, parts.headers, bytes)
}

/// Reads the next body frame's data (skipping non-data frames); `None` at the end of the body.
pub async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("no frame arrived in time")?
            .unwrap();
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// Reads body data until `needle` has been seen, returning everything read.
pub async fn read_until(body: &mut Incoming, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        match next_data(body).await {
            Some(data) => seen.push_str(std::str::from_utf8(&data).unwrap()),
            None => panic!("the body ended before {needle:?} arrived; got {seen:?}"),
        }
    }
    seen
}

pub fn error_json(body: &[u8]) -> serde_json::Value {
    let value: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    assert!(
        value["error"]["message"].is_string(),
        "not an OpenAI error: {value}"
    );
    assert!(
        value["error"]["type"].is_string(),
        "not an OpenAI error: {value}"
    );
    assert!(
        value["error"]["code"].is_string(),
        "not an OpenAI error: {value}"
    );
    value
}

/// `extra` laid over `base`, table by table.
pub fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(existing)), toml::Value::Table(value)) => {
                    merge(existing, value)
                }
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut base: toml::Table = base.parse().unwrap();
    merge(&mut base, extra.parse().unwrap());
    toml::to_string(&base).unwrap()
}

/// Boots the proxy in-process on the config file at `path` with live reload, and returns once
/// the admin port answers `/config` (the file watches are set up by then). The trigger reloads
/// at once, as SIGHUP does for the binary.
pub async fn start_live_proxy(
    path: &std::path::Path,
) -> (TestProxy, openrouter_proxy::ReloadTrigger) {
    let live = openrouter_proxy::LiveConfig::load(path).unwrap();
    let trigger = live.trigger();
    let api = TcpListener::bind(live.config().server.listen)
        .await
        .unwrap();
    let admin = TcpListener::bind(live.config().server.admin_listen)
        .await
        .unwrap();
    let addr = api.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(openrouter_proxy::serve_live(
        live,
        openrouter_proxy::Listeners { api, admin },
        async move {
            let _ = rx.await;
        },
    ));
    let proxy = TestProxy {
        addr,
        admin: admin_addr,
        shutdown: Some(tx),
        task: Some(task),
    };
    let (status, _, _) = read_all(send("GET", &proxy.admin_url("/config"), &[], "").await).await;
    assert_eq!(status, 200);
    (proxy, trigger)
}

/// Polls `condition` every 10 ms until it holds, failing the test with `what` after
/// [`PATIENCE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A scripted upstream that counts its open connections and requests, and that can be killed
/// (listener and every open connection dropped at once) and restarted on the same port. Unlike
/// [`MockUpstream`] it keeps no copy of the requests, so it suits long runs.
pub struct KillableUpstream {
    pub addr: SocketAddr,
    handler: Arc<Handler>,
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Decrements a connection count when the connection's task ends, however it ends.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> OpenConnection {
        open.fetch_add(1, Ordering::SeqCst);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl KillableUpstream {
    pub async fn start(
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> KillableUpstream {
        let listener = listen_deep(SocketAddr::from(([127, 0, 0, 1], 0)));
        let upstream = KillableUpstream {
            addr: listener.local_addr().unwrap(),
            handler: Arc::new(handler),
            open: Arc::default(),
            requests: Arc::default(),
            server: Mutex::new(None),
        };
        upstream.serve(listener);
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn request_count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Drops the listener and every open connection (as a crashed process would), and returns
    /// once all of them are closed.
    pub async fn kill(&self) {
        let server = self.server.lock().unwrap().take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
        wait_until("the killed upstream's connections to close", || {
            self.open_connections() == 0
        })
        .await;
    }

    /// Listens again on the same address (`SO_REUSEADDR`, as a restarted server would).
    pub async fn restart(&self) {
        self.serve(listen_deep(self.addr));
    }

    fn serve(&self, listener: TcpListener) {
        let (handler, open, requests) = (
            self.handler.clone(),
            self.open.clone(),
            self.requests.clone(),
        );
        let server = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let guard = OpenConnection::new(&open);
                        let (handler, requests) = (handler.clone(), requests.clone());
                        connections.spawn(async move {
                            let _guard = guard;
                            let service = service_fn(move |request| {
                                answer_counted(handler.clone(), requests.clone(), request)
                            });
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.server.lock().unwrap() = Some(server);
    }
}

/// A listener with `SO_REUSEADDR` and an accept queue of 4096 (`TcpListener::bind` asks for
/// 128, which drops connections when thousands arrive at once).
fn listen_deep(addr: SocketAddr) -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(4096).unwrap()
}

impl Drop for KillableUpstream {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }
}

async fn answer_counted(
    handler: Arc<Handler>,
    requests: Arc<AtomicUsize>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, std::io::Error> {
    let recorded = Recorded::read(request).await;
    let reply = handler(&recorded);
    requests.fetch_add(1, Ordering::SeqCst);
    reply_or_close(reply).await
}

impl TestProxy {
    /// Like [`TestProxy::start`], for an upstream given by its base URL.
    pub async fn start_for(base_url: &str, extra: &str) -> TestProxy {
        let key_file = temp_file("api-key", &format!("{TEST_KEY}\n"));
        let base = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\
             [upstream]\nbase_url = \"{base_url}\"\napi_key_file = \"{}\"\n",
            key_file.display()
        );
        TestProxy::start_with_config(&merge_toml(&base, extra)).await
    }

    /// The value of an unlabelled metric on `/metrics`, read over a connection of its own that
    /// is closed afterwards (so the scrape leaves no connection or task behind).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut text))
            .await
            .expect("/metrics did not answer in time")
            .unwrap();
        text.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }
}

/// This process's resident set size in bytes, from `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    rss_at("/proc/self/status")
}

/// The resident set size of process `pid` in bytes.
pub fn rss_of(pid: u32) -> u64 {
    rss_at(&format!("/proc/{pid}/status"))
}

fn rss_at(status: &str) -> u64 {
    let text = std::fs::read_to_string(status).unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

/// A small seeded generator, so that a failing random schedule can be replayed.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A number from the environment variable `name`, or `default` when it is unset.
pub fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {text:?}")),
        Err(_) => default,
    }
}

/// The real `openrouter-proxy` binary, started with a config file; its bound addresses are read
/// from the start-up log line, and the rest of its stdout is collected.
pub struct BinaryProxy {
    pub child: tokio::process::Child,
    pub api: String,
    pub admin: String,
    logs: Option<tokio::task::JoinHandle<()>>,
    /// Every line the process wrote after start-up, as it arrives.
    lines: Arc<Mutex<Vec<String>>>,
}

impl BinaryProxy {
    pub async fn spawn(config: &std::path::Path, extra_args: &[&str]) -> BinaryProxy {
        BinaryProxy::spawn_with(&[], config, extra_args).await
    }

    /// Like [`BinaryProxy::spawn`], run through `wrapper` (e.g. `["prlimit", "--nofile=256", "--"]`).
    pub async fn spawn_with(
        wrapper: &[&str],
        config: &std::path::Path,
        extra_args: &[&str],
    ) -> BinaryProxy {
        use tokio::io::AsyncBufReadExt;
        let binary = env!("CARGO_BIN_EXE_openrouter-proxy");
        let (program, args) = match wrapper.split_first() {
            Some((program, args)) => (*program, [args, &[binary]].concat()),
            None => (binary, Vec::new()),
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .arg("--config")
            .arg(config)
            .args(extra_args)
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (api, admin) = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                if event["message"] == "listening" {
                    return (
                        event["api"].as_str().unwrap().to_owned(),
                        event["admin"].as_str().unwrap().to_owned(),
                    );
                }
            }
            panic!("the proxy exited before listening");
        })
        .await
        .unwrap();
        let collected = Arc::new(Mutex::new(Vec::new()));
        let all = collected.clone();
        let logs = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                all.lock().unwrap().push(line);
            }
        });
        BinaryProxy {
            child,
            api,
            admin,
            logs: Some(logs),
            lines: collected,
        }
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the process.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = tokio::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// What the process has written to standard output since start-up, so far.
    pub fn logged(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for the process to exit; returns its status and everything it logged after start-up.
    pub async fn wait(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        self.logs.take().unwrap().await.unwrap();
        (status, self.logged())
    }
}

/// POSTs a chat request to the proxy and returns the answer with its body unread.
pub async fn chat_request(proxy: &TestProxy, body: &str) -> Response<Incoming> {
    send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        body.to_owned(),
    )
    .await
}

/// A one-message chat request through `proxy`, which must answer 200; the answer's body.
pub async fn chat_ok(proxy: &TestProxy) -> Bytes {
    let (status, _, body) = post_json(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    body
}

/// Waits until `/readyz` on `admin` answers 503; fails the test if it never does.
pub async fn wait_not_ready(admin: &str) {
    let url = format!("http://{admin}/readyz");
    let turned = tokio::time::timeout(PATIENCE, async {
        loop {
            let (status, _, _) = read_all(send("GET", &url, &[], "").await).await;
            if status == 503 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(turned.is_ok(), "readiness never turned 503");
}

/// The repository root.
pub fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with the official SDKs (`scripts/test` installs them in `target/sdk-venv`).
pub fn python() -> PathBuf {
    let path = std::env::var_os("OPENAI_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/sdk-venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with the openai and anthropic packages at {}: run scripts/test (or set OPENAI_SDK_PYTHON)",
        path.display()
    );
    path
}

/// Runs an SDK client against `proxy` (its SDK's base URL variable pointing at it, no key of the
/// environment's) and fails the test with the client's output unless it exits successfully.
pub async fn run_client(mut command: tokio::process::Command, proxy: &TestProxy) {
    command
        .env("OPENAI_BASE_URL", proxy.url("/v1"))
        .env("ANTHROPIC_BASE_URL", proxy.url(""))
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN");
    client_output(command, PATIENCE * 3).await;
}

/// Runs an SDK client (stdin closed, killed if the test ends first) for at most `patience`, and
/// fails the test with its stdout and stderr unless it exits successfully.
pub async fn client_output(
    mut command: tokio::process::Command,
    patience: Duration,
) -> std::process::Output {
    let running = command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(patience, running)
        .await
        .expect("the SDK client did not finish in time")
        .expect("could not start the SDK client");
    assert!(
        output.status.success(),
        "SDK client failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// [`client_output`] of a client that prints a JSON value as its last line: that value.
pub async fn client_json(
    command: tokio::process::Command,
    patience: Duration,
) -> serde_json::Value {
    let output = client_output(command, patience).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}
