//! Load comparison: one load generator drives a fast in-process mock upstream both directly and
//! through the release proxy binary, alternating round by round so that machine noise hits both
//! sides alike, and prints a markdown table of what the proxy adds.
//!
//! Run it with `scripts/bench` (or `cargo bench --bench load -- --help` for the flags). Under
//! `cargo test` it does nothing: it needs the release binary and takes a minute.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly on set-up errors"
)]
#![allow(
    clippy::too_many_lines,
    reason = "a measurement round reads top to bottom: set-up, load, every figure of the table"
)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch, Semaphore};

#[path = "load/nginx.rs"]
mod nginx;

const USAGE: &str = "\
usage: cargo bench --bench load -- [FLAGS]

  --quick               a short smoke run (about 20 s): fewer requests, rounds and streams
  --requests N          requests per side for the concurrency-1 run (default 20000); the
                        concurrency-16 run sends 2N and the saturation run 3N
  --rounds N            alternating direct/proxied rounds per scenario (default 10)
  --concurrency A,B     fixed-concurrency latency runs (default 1,16)
  --saturation C        connections for the throughput run (default 64)
  --sse-streams N       concurrent SSE streams per round (default 8)
  --sse-chunks N        chunks per SSE stream (default 100)
  --sse-interval-ms N   pause between chunks (default 2)
  --streams A,B         open-stream counts for the memory runs (default 1000,10000; 0 skips)
  --source-ips N        spread memory-run connections over 127.0.0.2 .. 127.0.0.(N+1)
                        (default: one more address per 20000 streams)
  --proxy PATH          the proxy binary (default: target/release/openrouter-proxy, built if missing)
  --worker-threads N    the proxy's server.worker_threads (default 1; 0: one per core)
  --nginx PATH          the nginx binary for the floor column (default: nginx on the PATH or in
                        /usr/sbin; without one the column is left out)
  --no-nginx            leave the nginx columns out
  --baseline PATH       another build of the proxy (say, of the commit before a change) as a
                        column of its own, measured in the same rounds
  --no-tls              leave out the columns through a TLS + HTTP/2 origin (an nginx with a
                        self-signed certificate in front of the mock, reached by nginx and by
                        the proxy; needs nginx and openssl)
  --otel                one more column: the proxy tracing every request ([otel] with
                        sample_ratio = 1), exporting over OTLP/HTTP to the mock, which accepts
                        every export";

/// The request header that makes the mock answer with SSE: `<chunks> <interval_us> <hold 0|1>`.
const SSE_HEADER: &str = "x-bench-sse";

/// One clock for the mock's send stamps and the client's arrival times (same process).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
    requests: usize,
    rounds: usize,
    concurrency: Vec<usize>,
    saturation: usize,
    sse_streams: usize,
    sse_chunks: usize,
    sse_interval: Duration,
    streams: Vec<usize>,
    source_ips: Option<usize>,
    proxy: Option<PathBuf>,
    /// `server.worker_threads` of the proxy under test.
    worker_threads: usize,
    /// nginx for the floor column; `None` leaves it out.
    nginx: Option<PathBuf>,
    /// The TLS + HTTP/2 origin columns (they need nginx and openssl).
    tls: bool,
    /// Another build of the proxy, as a column of its own: before and after a change, one run.
    baseline: Option<PathBuf>,
    /// A column for the proxy tracing every request.
    otel: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            requests: 20_000,
            rounds: 10,
            concurrency: vec![1, 16],
            saturation: 64,
            sse_streams: 8,
            sse_chunks: 100,
            sse_interval: Duration::from_millis(2),
            streams: vec![1_000, 10_000],
            source_ips: None,
            proxy: None,
            worker_threads: 1,
            nginx: nginx::find(None),
            tls: true,
            baseline: None,
            otel: false,
        };
        let number = |value: Option<&String>, flag: &str| -> Result<usize, String> {
            value
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{flag} needs a number"))
        };
        let list = |value: Option<&String>, flag: &str| -> Result<Vec<usize>, String> {
            let value = value.ok_or_else(|| format!("{flag} needs a list such as 1,16"))?;
            value
                .split(',')
                .map(|n| n.trim().parse::<usize>())
                .filter(|n| n != &Ok(0))
                .collect::<Result<_, _>>()
                .map_err(|_| format!("{flag} needs a list of numbers, got {value:?}"))
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--bench" => {}
                "--quick" => {
                    options.requests = 2_000;
                    options.rounds = 4;
                    options.sse_chunks = 30;
                    options.streams = vec![1_000];
                }
                "--requests" => options.requests = number(it.next(), arg)?.max(1),
                "--rounds" => options.rounds = number(it.next(), arg)?.max(1),
                "--concurrency" => options.concurrency = list(it.next(), arg)?,
                "--saturation" => options.saturation = number(it.next(), arg)?.max(1),
                "--sse-streams" => options.sse_streams = number(it.next(), arg)?,
                "--sse-chunks" => options.sse_chunks = number(it.next(), arg)?.max(1),
                "--sse-interval-ms" => {
                    options.sse_interval = Duration::from_millis(number(it.next(), arg)? as u64)
                }
                "--streams" => options.streams = list(it.next(), arg)?,
                "--worker-threads" => options.worker_threads = number(it.next(), arg)?,
                "--otel" => options.otel = true,
                "--source-ips" => options.source_ips = Some(number(it.next(), arg)?.clamp(1, 250)),
                "--proxy" => {
                    options.proxy = Some(it.next().ok_or("--proxy needs a path")?.into());
                }
                "--nginx" => {
                    let path: PathBuf = it.next().ok_or("--nginx needs a path")?.into();
                    options.nginx = nginx::find(Some(&path));
                }
                "--no-nginx" => options.nginx = None,
                "--no-tls" => options.tls = false,
                "--baseline" => {
                    options.baseline = Some(it.next().ok_or("--baseline needs a path")?.into());
                }
                "--help" | "-h" => return Err(USAGE.to_owned()),
                other => return Err(format!("unknown flag {other:?}\n\n{USAGE}")),
            }
        }
        Ok(options)
    }
}

// ---------------------------------------------------------------------------------------------
// The mock upstream: a bare hyper HTTP/1.1 server on its own thread, so it neither waits for nor
// delays the load generator.

struct Mock {
    addr: SocketAddr,
    /// Bumping the value ends every held stream.
    release: Arc<watch::Sender<u64>>,
}

fn start_mock() -> Mock {
    let (release, _) = watch::channel(0u64);
    let release = Arc::new(release);
    let served = release.clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mock-upstream".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket.set_reuseaddr(true).unwrap();
                socket
                    .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                    .unwrap();
                let listener = socket.listen(8192).unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let release = served.clone();
                    tokio::spawn(async move {
                        let service =
                            service_fn(move |request| mock_answer(request, release.subscribe()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })
        .unwrap();
    Mock {
        addr: addr_rx.recv().unwrap(),
        release,
    }
}

/// A non-streaming chat completion of about 1 KB, built once.
fn chat_completion() -> &'static Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| {
        let content = "The proxy forwards this answer unchanged. ".repeat(18);
        Bytes::from(
            serde_json::json!({
                "id": "gen-bench-0123456789", "object": "chat.completion", "created": 1_700_000_000,
                "model": "openai/gpt-4o-mini", "provider": "OpenAI",
                "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content, "refusal": null}}],
                "usage": {"prompt_tokens": 57, "completion_tokens": 180, "total_tokens": 237, "cost": 0.000116}
            })
            .to_string(),
        )
    })
}

fn sse_chunk(stamp_ns: u64) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"gen-bench-0123456789\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
         \"model\":\"openai/gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\
         \"content\":\" token\"}},\"finish_reason\":null}}],\"t\":{stamp_ns}}}\n\n"
    ))
}

#[derive(Clone, Copy)]
struct SseSpec {
    chunks: usize,
    interval: Duration,
    /// After the first chunk, wait for [`Mock::release`] before sending the rest.
    hold: bool,
}

impl SseSpec {
    fn header(&self) -> HeaderValue {
        let text = format!(
            "{} {} {}",
            self.chunks,
            self.interval.as_micros(),
            u8::from(self.hold)
        );
        HeaderValue::from_str(&text).unwrap()
    }

    fn parse(value: &str) -> Option<SseSpec> {
        let mut parts = value.split(' ').map(str::parse::<u64>);
        Some(SseSpec {
            chunks: parts.next()?.ok()? as usize,
            interval: Duration::from_micros(parts.next()?.ok()?),
            hold: parts.next()?.ok()? == 1,
        })
    }
}

async fn mock_answer(
    request: Request<Incoming>,
    release: watch::Receiver<u64>,
) -> Result<Response<MockBody>, Infallible> {
    let sse = request
        .headers()
        .get(SSE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(SseSpec::parse);
    let export = request.uri().path() == "/v1/traces";
    // Read the whole request, as a real upstream does before answering.
    let _ = request.into_body().collect().await;
    if export {
        // An empty ExportTraceServiceResponse: every span accepted.
        let accepted = Response::builder()
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(MockBody::Json(Some(Bytes::new())));
        return Ok(accepted.unwrap());
    }
    let response = match sse {
        None => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(MockBody::Json(Some(chat_completion().clone()))),
        Some(spec) => Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(MockBody::Sse(Box::new(SseStream::new(spec, release)))),
    };
    Ok(response.unwrap())
}

enum MockBody {
    Json(Option<Bytes>),
    Sse(Box<SseStream>),
}

struct SseStream {
    spec: SseSpec,
    sent: usize,
    pause: Pin<Box<tokio::time::Sleep>>,
    hold: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    done: bool,
}

impl SseStream {
    fn new(spec: SseSpec, mut release: watch::Receiver<u64>) -> SseStream {
        let hold = spec.hold.then(|| {
            Box::pin(async move {
                let _ = release.changed().await;
            }) as Pin<Box<dyn Future<Output = ()> + Send>>
        });
        SseStream {
            spec,
            sent: 0,
            pause: Box::pin(tokio::time::sleep(spec.interval)),
            hold,
            done: false,
        }
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        // The first chunk goes out at once; the rest wait for the release (held streams) and the
        // pacing interval.
        if self.sent > 0 {
            if let Some(hold) = &mut self.hold {
                ready!(hold.as_mut().poll(cx));
                self.hold = None;
            }
            if self.sent < self.spec.chunks {
                ready!(self.pause.as_mut().poll(cx));
            }
        }
        if self.sent < self.spec.chunks {
            self.sent += 1;
            let next = tokio::time::Instant::now() + self.spec.interval;
            self.pause.as_mut().reset(next);
            return Poll::Ready(Some(sse_chunk(now_ns())));
        }
        self.done = true;
        Poll::Ready(Some(Bytes::from_static(b"data: [DONE]\n\n")))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let data = match self.get_mut() {
            MockBody::Json(bytes) => bytes.take(),
            MockBody::Sse(stream) => ready!(stream.poll_chunk(cx)),
        };
        Poll::Ready(data.map(|data| Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            MockBody::Json(Some(bytes)) => http_body::SizeHint::with_exact(bytes.len() as u64),
            MockBody::Json(None) => http_body::SizeHint::with_exact(0),
            MockBody::Sse(_) => http_body::SizeHint::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy, as the release binary in a child process, so its CPU time and memory are its own.

/// The running proxy; dropping it (also while a panic unwinds) kills the process.
struct ProxyProcess {
    child: Child,
    api: SocketAddr,
}

/// Where the proxy under test sends its requests.
struct UpstreamSpec {
    base_url: String,
    /// A certificate to trust (the TLS origin's self-signed one).
    ca_file: Option<PathBuf>,
    /// Where spans go when `traced`: the mock, which accepts every export.
    collector: SocketAddr,
    /// `[otel]` with every request sampled.
    traced: bool,
}

impl UpstreamSpec {
    fn plain(mock: SocketAddr) -> UpstreamSpec {
        UpstreamSpec {
            base_url: format!("http://{mock}/api/v1"),
            ca_file: None,
            collector: mock,
            traced: false,
        }
    }
}

impl ProxyProcess {
    /// Starts the proxy in front of `upstream`, which it reaches at `base_url`, trusting
    /// `upstream.ca_file` when given.
    fn start(
        binary: &Path,
        upstream: &UpstreamSpec,
        max_connections: usize,
        worker_threads: usize,
        log_level: &str,
    ) -> ProxyProcess {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-load");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join(format!(
            "proxy-{}-{}.toml",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let base_url = &upstream.base_url;
        // At `warn` the access log is off; the start-up line (target openrouter_proxy, level
        // info) still tells us the bound addresses. At `info` every request writes its line.
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_connections = {max_connections}
worker_threads = {worker_threads}
drain_delay = "0s"
shutdown_grace = "1s"

[upstream]
base_url = "{base_url}"
api_key_env = "OPENROUTER_API_KEY"

[upstream.headers]
"HTTP-Referer" = "https://example.com"
"X-Title" = "bench"

[log]
format = "json"
level = "{log_level}"

[[routes]]
name = "fast"
match = {{ model = "fast" }}
model = "openai/gpt-4o-mini"
fallbacks = ["anthropic/claude-3.5-haiku"]

[[routes]]
name = "cached"
match = {{ model = "cached" }}
model = "openai/gpt-4o-mini"
cache_ttl = "1h"
"#
        );
        let text = if upstream.traced {
            format!(
                "{text}\n[otel]\nendpoint = \"http://{}\"\nsample_ratio = 1.0\n",
                upstream.collector
            )
        } else {
            text
        };
        std::fs::write(&config, text).unwrap();
        let mut command = Command::new(binary);
        if let Some(ca_file) = &upstream.ca_file {
            // The system roots the proxy adds to its own include this file.
            command.env("SSL_CERT_FILE", ca_file);
        }
        let mut child = command
            .arg("--config")
            .arg(&config)
            .env("OPENROUTER_API_KEY", "bench")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stdout = child.stdout.take().unwrap();
        let mut proxy = ProxyProcess {
            child,
            api: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        };
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains("\"listening\"") {
                    sent = true;
                    let _ = line_tx.send(line);
                } else if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("proxy: {line}");
                }
            }
        });
        let line = line_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy did not report its listeners within 30 s");
        let start: serde_json::Value = serde_json::from_str(&line).unwrap();
        proxy.api = start["api"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no api address in {line}"));
        proxy
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_kib(&self, key: &str) -> u64 {
        process_status_kib(self.pid(), key)
    }
}

/// User plus system CPU time of process `pid` so far.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux whatever the kernel's own tick rate.
    Duration::from_millis(ticks * 10)
}

/// A `Vm*` line of /proc/<pid>/status, in KiB.
fn process_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy binary: `--proxy`, else the release build, built now when it is missing.
fn proxy_binary(options: &Options) -> PathBuf {
    if let Some(path) = &options.proxy {
        return path.clone();
    }
    // CARGO_TARGET_TMPDIR is <target dir>/tmp, whatever CARGO_TARGET_DIR says.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let binary = target.join("release").join("openrouter-proxy");
    if !binary.exists() {
        eprintln!("building {} ...", binary.display());
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "openrouter-proxy"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "building the proxy failed");
    }
    binary
}

/// How many streams the open-file limit allows: each costs two descriptors here (client and mock
/// side) and two in the proxy (client and upstream side), which inherits the limit.
fn stream_capacity() -> usize {
    let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    (soft as usize).saturating_sub(256) / 2
}

/// Raises the open-file limit as far as the streams need and the process may.
fn raise_fd_limit(streams: usize) {
    let want = (2 * streams + 4096) as u64;
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    if soft >= want {
        return;
    }
    // Raising the hard limit needs root (CAP_SYS_RESOURCE); otherwise go as far as it allows.
    if rlimit::Resource::NOFILE.set(want, want.max(hard)).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
    let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((soft, hard));
    if soft < want {
        eprintln!(
            "note: the open-file limit is {soft} and {streams} streams need about {want}; the \
             memory run opens {} and projects the rest (raise the hard limit to measure all)",
            stream_capacity()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator: one HTTP/1.1 keep-alive connection per virtual client.

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    path: &'static str,
    host: HeaderValue,
}

impl Target {
    fn new(addr: SocketAddr, path: &'static str) -> Target {
        Target {
            addr,
            path,
            host: HeaderValue::from_str(&addr.to_string()).unwrap(),
        }
    }

    fn request(&self, body: &Bytes, sse: Option<SseSpec>) -> Request<Full<Bytes>> {
        let mut request = Request::post(self.path)
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer unused")
            .header(header::USER_AGENT, "openrouter-proxy-bench/1");
        if let Some(spec) = sse {
            request = request.header(SSE_HEADER, spec.header());
        }
        request.body(Full::new(body.clone())).unwrap()
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<Sender, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::from((ip, 0)))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn connect_all(addr: SocketAddr, n: usize) -> Vec<Sender> {
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        senders.push(connect(addr, None).await.unwrap());
    }
    senders
}

fn chat_body(stream: bool) -> Bytes {
    chat_body_for("fast", stream)
}

/// The benchmark's chat request for `model` (`cached` routes to a caching route).
fn chat_body_for(model: &str, stream: bool) -> Bytes {
    let question = "Summarise the trade-offs between running an LLM gateway as a sidecar and as a \
                    shared deployment, in terms of latency, blast radius, configuration \
                    ownership and cost attribution. Answer in five short bullet points.";
    Bytes::from(
        serde_json::json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant for platform engineers."},
                {"role": "user", "content": question}
            ],
            "temperature": 0.2,
            "max_tokens": 256,
            "stream": stream
        })
        .to_string(),
    )
}

/// Latencies of one side of one scenario, with the time it took.
#[derive(Default)]
struct Samples {
    ns: Vec<u64>,
    elapsed: Duration,
    requests: usize,
    errors: usize,
}

impl Samples {
    fn absorb(&mut self, other: Samples) {
        self.ns.extend(other.ns);
        self.elapsed += other.elapsed;
        self.requests += other.requests;
        self.errors += other.errors;
    }

    fn percentile(&mut self, p: f64) -> f64 {
        if self.ns.is_empty() {
            return f64::NAN;
        }
        self.ns.sort_unstable();
        let index = ((p / 100.0) * (self.ns.len() - 1) as f64).round() as usize;
        self.ns[index] as f64 / 1000.0
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// `requests` non-streaming chat completions, spread over the connections in `senders`, each
/// sending its next request as soon as the previous answer is read (a closed loop).
async fn closed_loop(
    target: &Target,
    senders: Vec<Sender>,
    requests: usize,
    body: &Bytes,
) -> (Vec<Sender>, Samples) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (target, next, body) = (target.clone(), next.clone(), body.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    // hyper takes the next request once the connection has finished the last
                    // exchange; sending before then fails with "connection was not ready".
                    if sender.ready().await.is_err() {
                        samples.errors += 1;
                        break;
                    }
                    let sent = Instant::now();
                    let ok = match sender.send_request(target.request(&body, None)).await {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.into_body().collect().await;
                            status.is_success() && body.is_ok()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        samples.ns.push(sent.elapsed().as_nanos() as u64);
                        samples.requests += 1;
                    } else {
                        samples.errors += 1;
                    }
                }
                (sender, samples)
            })
        })
        .collect();
    let mut total = Samples::default();
    let mut senders = Vec::new();
    for worker in workers {
        let (sender, samples) = worker.await.unwrap();
        senders.push(sender);
        total.absorb(samples);
    }
    total.elapsed = started.elapsed();
    (senders, total)
}

/// Per-chunk delays (arrival minus the mock's send stamp) and time to the first chunk.
#[derive(Default)]
struct SseSamples {
    first_chunk: Samples,
    chunk_delay: Samples,
}

/// One round of SSE streams, one per connection in `senders`, all at once.
async fn sse_round(
    target: &Target,
    senders: Vec<Sender>,
    spec: SseSpec,
) -> (Vec<Sender>, SseSamples) {
    let body = chat_body(true);
    let workers: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (target, body) = (target.clone(), body.clone());
            tokio::spawn(async move {
                let mut samples = SseSamples::default();
                sender.ready().await.unwrap();
                let sent = Instant::now();
                let response = sender
                    .send_request(target.request(&body, Some(spec)))
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "SSE answered {}",
                    response.status()
                );
                let mut body = response.into_body();
                let mut pending: Vec<u8> = Vec::new();
                let mut first = true;
                while let Some(frame) = body.frame().await {
                    let Ok(data) = frame.unwrap().into_data() else {
                        continue;
                    };
                    let arrived = now_ns();
                    let elapsed = sent.elapsed();
                    pending.extend_from_slice(&data);
                    while let Some(end) = memchr::memmem::find(&pending, b"\n\n") {
                        if let Some(stamp) = send_stamp(&pending[..end]) {
                            samples.chunk_delay.ns.push(arrived.saturating_sub(stamp));
                            samples.chunk_delay.requests += 1;
                            if first {
                                first = false;
                                samples.first_chunk.ns.push(elapsed.as_nanos() as u64);
                                samples.first_chunk.requests += 1;
                            }
                        }
                        pending.drain(..end + 2);
                    }
                }
                (sender, samples)
            })
        })
        .collect();
    let mut total = SseSamples::default();
    let mut senders = Vec::new();
    for worker in workers {
        let (sender, samples) = worker.await.unwrap();
        senders.push(sender);
        total.first_chunk.absorb(samples.first_chunk);
        total.chunk_delay.absorb(samples.chunk_delay);
    }
    (senders, total)
}

/// The `"t":<ns>` the mock put in a chunk.
fn send_stamp(event: &[u8]) -> Option<u64> {
    let at = memchr::memmem::rfind(event, b"\"t\":")? + 4;
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// One way to reach the mock: directly, through nginx, through the proxy.
struct Side {
    name: &'static str,
    target: Target,
    /// The process in between, for its CPU time; `None` when direct.
    pid: Option<u32>,
}

/// Every side of a closed-loop scenario, measured in rotating rounds.
struct Comparison {
    label: String,
    concurrency: usize,
    /// One per side, in the order of the sides.
    samples: Vec<Samples>,
    cpu: Vec<Duration>,
}

/// Rounds rotate the order of the sides, so drift in the machine's load favours none.
fn order(round: usize, sides: usize) -> impl Iterator<Item = usize> {
    (0..sides).map(move |i| (i + round) % sides)
}

async fn compare(
    label: String,
    sides: &[Side],
    concurrency: usize,
    requests: usize,
    rounds: usize,
    body: &Bytes,
) -> Comparison {
    let mut senders = Vec::new();
    for side in sides {
        senders.push(connect_all(side.target.addr, concurrency).await);
    }
    // Warm-up: connections, the upstream pools, allocator caches.
    for (index, side) in sides.iter().enumerate() {
        let taken = std::mem::take(&mut senders[index]);
        let (back, _) = closed_loop(&side.target, taken, concurrency * 50, body).await;
        senders[index] = back;
    }
    let mut result = Comparison {
        label,
        concurrency,
        samples: sides.iter().map(|_| Samples::default()).collect(),
        cpu: vec![Duration::ZERO; sides.len()],
    };
    let per_round = requests.div_ceil(rounds);
    for round in 0..rounds {
        for index in order(round, sides.len()) {
            let side = &sides[index];
            let cpu_before = side.pid.map(process_cpu);
            let taken = std::mem::take(&mut senders[index]);
            let (back, samples) = closed_loop(&side.target, taken, per_round, body).await;
            senders[index] = back;
            if let (Some(pid), Some(before)) = (side.pid, cpu_before) {
                result.cpu[index] += process_cpu(pid) - before;
            }
            result.samples[index].absorb(samples);
        }
    }
    result
}

async fn compare_sse(
    sides: &[Side],
    streams: usize,
    spec: SseSpec,
    rounds: usize,
) -> Vec<SseSamples> {
    let mut senders = Vec::new();
    for side in sides {
        senders.push(connect_all(side.target.addr, streams).await);
    }
    let mut results: Vec<SseSamples> = sides.iter().map(|_| SseSamples::default()).collect();
    let warm = SseSpec { chunks: 3, ..spec };
    for (index, side) in sides.iter().enumerate() {
        let (back, _) = sse_round(&side.target, std::mem::take(&mut senders[index]), warm).await;
        senders[index] = back;
    }
    for round in 0..rounds {
        for index in order(round, sides.len()) {
            let taken = std::mem::take(&mut senders[index]);
            let (back, samples) = sse_round(&sides[index].target, taken, spec).await;
            senders[index] = back;
            results[index].first_chunk.absorb(samples.first_chunk);
            results[index].chunk_delay.absorb(samples.chunk_delay);
        }
    }
    results
}

struct MemoryResult {
    /// The count asked for; `streams` may be lower when descriptors do not suffice.
    asked: usize,
    streams: usize,
    opened: usize,
    failure: Option<String>,
    rss_before_kib: u64,
    rss_after_kib: u64,
    open_time: Duration,
}

impl MemoryResult {
    fn per_stream_kib(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib)) as f64 / self.opened.max(1) as f64
    }
}

/// Opens `n` SSE streams through a fresh proxy, all held open by the mock after their first
/// chunk, and reads the proxy's resident memory before and after.
async fn memory_run(
    binary: &Path,
    mock: &Mock,
    n: usize,
    source_ips: Option<usize>,
    worker_threads: usize,
) -> MemoryResult {
    let proxy = ProxyProcess::start(
        binary,
        &UpstreamSpec::plain(mock.addr),
        (2 * n).max(20_000),
        worker_threads,
        WARN_LOG,
    );
    let target = Target::new(proxy.api, "/v1/chat/completions");
    // Warm the proxy up with both kinds of request so one-time allocations are in the baseline.
    let senders = connect_all(proxy.api, 4).await;
    let (senders, _) = closed_loop(&target, senders, 200, &chat_body(false)).await;
    let short = SseSpec {
        chunks: 3,
        interval: Duration::ZERO,
        hold: false,
    };
    let (senders, _) = sse_round(&target, senders, short).await;
    drop(senders);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_kib = proxy.status_kib("VmRSS");

    let ips = source_ips.unwrap_or_else(|| n.div_ceil(20_000));
    let source = move |i: usize| (ips > 1).then(|| Ipv4Addr::new(127, 0, 0, 2 + (i % ips) as u8));
    let hold = SseSpec {
        chunks: 2,
        interval: Duration::ZERO,
        hold: true,
    };
    let opening = Arc::new(Semaphore::new(256));
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let body = chat_body(true);
    let started = Instant::now();
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let (target, body, opening, opened_tx) = (
                target.clone(),
                body.clone(),
                opening.clone(),
                opened_tx.clone(),
            );
            tokio::spawn(async move {
                let permit = opening.acquire_owned().await.unwrap();
                let open = async {
                    let mut sender = connect(target.addr, source(i)).await?;
                    let response = sender
                        .send_request(target.request(&body, Some(hold)))
                        .await
                        .map_err(|e| format!("request: {e}"))?;
                    if !response.status().is_success() {
                        return Err(format!("the proxy answered {}", response.status()));
                    }
                    let mut body = response.into_body();
                    // The first chunk has arrived: the stream is open end to end.
                    body.frame()
                        .await
                        .ok_or("no first chunk")?
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((sender, body))
                };
                match open.await {
                    Ok((sender, mut body)) => {
                        drop(permit);
                        let _ = opened_tx.send(Ok(()));
                        while let Some(Ok(_)) = body.frame().await {}
                        drop(sender);
                    }
                    Err(error) => {
                        let _ = opened_tx.send(Err(error));
                    }
                }
            })
        })
        .collect();
    drop(opened_tx);
    let mut opened = 0;
    let mut failure = None;
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(120), opened_rx.recv()).await {
            Ok(Some(Ok(()))) => opened += 1,
            Ok(Some(Err(error))) => {
                failure.get_or_insert(error);
            }
            Ok(None) => break,
            Err(_) => {
                failure.get_or_insert("timed out opening streams".into());
                break;
            }
        }
    }
    let open_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after_kib = proxy.status_kib("VmRSS");
    mock.release.send_modify(|generation| *generation += 1);
    for stream in streams {
        let _ = tokio::time::timeout(Duration::from_secs(60), stream).await;
    }
    drop(proxy);
    MemoryResult {
        asked: n,
        streams: n,
        opened,
        failure,
        rss_before_kib,
        rss_after_kib,
        open_time,
    }
}

// ---------------------------------------------------------------------------------------------
// The report

/// The proxy's log filter with the access log off, and with it on.
const WARN_LOG: &str = "warn,openrouter_proxy=info";
const INFO_LOG: &str = "info";

/// The report: one column per side, every figure of a proxying side with what it adds to the
/// direct one, and the goal it is held to.
struct Table {
    sides: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn row(&mut self, metric: &str, cells: Vec<String>, target: &str, met: Option<bool>) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "",
        };
        let mut row = vec![metric.to_owned()];
        row.extend(cells);
        row.push(target.to_owned());
        row.push(verdict.to_owned());
        self.rows.push(row);
    }

    /// A row of per-side values in µs: the direct value, then each other side's with what it
    /// adds to the direct one.
    fn latency(&mut self, metric: &str, values: &[f64], target: &str, met: Option<bool>) {
        let cells = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i == 0 {
                    us(*v)
                } else {
                    format!("{} ({})", us(*v), signed_us(v - values[0]))
                }
            })
            .collect();
        self.row(metric, cells, target, met);
    }

    fn print(&self) {
        println!("| measure | {} | goal | |", self.sides.join(" | "));
        println!("|---|{}---|---|", "---:|".repeat(self.sides.len()));
        for row in &self.rows {
            println!("| {} |", row.join(" | "));
        }
    }
}

fn us(value: f64) -> String {
    format!("{value:.1} µs")
}

fn signed_us(value: f64) -> String {
    format!("{value:+.1}")
}

fn kib(value: u64) -> String {
    if value >= 10 * 1024 {
        format!("{:.1} MiB", value as f64 / 1024.0)
    } else {
        format!("{value} KiB")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and must not start a
    // minute of load against a release build.
    if !args.iter().any(|a| a == "--bench") {
        println!("load: skipped outside `cargo bench` (run scripts/bench)");
        return;
    }
    let options = match Options::parse(&args) {
        Ok(options) => options,
        Err(message) if message == USAGE => {
            println!("{USAGE}");
            return;
        }
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    raise_fd_limit(options.streams.iter().copied().max().unwrap_or(0));
    let binary = proxy_binary(&options);
    let mock = start_mock();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(&options, &binary, &mock, &args));
}

/// The TLS + HTTP/2 pair: an nginx origin with a self-signed certificate in front of the mock
/// (what OpenRouter is to the proxy), reached by nginx `proxy_pass` and by the proxy.
struct TlsSides {
    _origin: nginx::Nginx,
    nginx: nginx::Nginx,
    proxy: ProxyProcess,
}

impl TlsSides {
    fn start(
        nginx: &Path,
        proxy: &Path,
        mock: &Mock,
        tmp: &Path,
        threads: usize,
    ) -> Option<TlsSides> {
        let Some((cert, key)) = nginx::self_signed(&tmp.join("tls")) else {
            eprintln!("no openssl to make a certificate: the TLS columns are left out");
            return None;
        };
        let origin_role = nginx::Role::TlsOrigin {
            upstream: mock.addr,
            cert: &cert,
            key: &key,
        };
        let origin = nginx::Nginx::start(nginx, &origin_role, 20_000, tmp);
        let front_role = nginx::Role::FrontTls {
            upstream: origin.addr,
        };
        let front = nginx::Nginx::start(nginx, &front_role, 20_000, tmp);
        let upstream = UpstreamSpec {
            base_url: format!("https://localhost:{}/api/v1", origin.addr.port()),
            ca_file: Some(cert),
            collector: mock.addr,
            traced: false,
        };
        let proxy = ProxyProcess::start(proxy, &upstream, 20_000, threads, WARN_LOG);
        Some(TlsSides {
            _origin: origin,
            nginx: front,
            proxy,
        })
    }
}

/// Indexes of the sides in a run: direct first, nginx when present, the proxy at warn and at info.
struct Layout {
    nginx: Option<usize>,
    proxy: usize,
    proxy_info: usize,
}

async fn run(options: &Options, binary: &Path, mock: &Mock, args: &[String]) {
    let plain = UpstreamSpec::plain(mock.addr);
    let threads = options.worker_threads;
    let proxy = ProxyProcess::start(binary, &plain, 20_000, threads, WARN_LOG);
    let proxy_info = ProxyProcess::start(binary, &plain, 20_000, threads, INFO_LOG);
    let traced = options.otel.then(|| {
        let spec = UpstreamSpec {
            traced: true,
            ..UpstreamSpec::plain(mock.addr)
        };
        ProxyProcess::start(binary, &spec, 20_000, threads, WARN_LOG)
    });
    let baseline = options
        .baseline
        .as_ref()
        .map(|other| ProxyProcess::start(other, &plain, 20_000, threads, WARN_LOG));
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-load");
    let nginx = options.nginx.as_ref().map(|binary| {
        let role = nginx::Role::Front {
            upstream: mock.addr,
        };
        nginx::Nginx::start(binary, &role, 20_000, &tmp)
    });
    let tls = match &options.nginx {
        Some(nginx) if options.tls => TlsSides::start(nginx, binary, mock, &tmp, threads),
        _ => None,
    };
    let chat = "/api/v1/chat/completions";
    let mut sides = vec![Side {
        name: "direct",
        target: Target::new(mock.addr, chat),
        pid: None,
    }];
    if let Some(nginx) = &nginx {
        sides.push(Side {
            name: "nginx proxy_pass",
            target: Target::new(nginx.addr, chat),
            pid: Some(nginx.pid()),
        });
    }
    let layout = Layout {
        nginx: nginx.as_ref().map(|_| 1),
        proxy: sides.len(),
        proxy_info: sides.len() + 1,
    };
    for (name, process) in [("proxy", &proxy), ("proxy, info access log", &proxy_info)] {
        sides.push(Side {
            name,
            target: Target::new(process.api, "/v1/chat/completions"),
            pid: Some(process.pid()),
        });
    }
    if let Some(traced) = &traced {
        sides.push(Side {
            name: "proxy, traced (sampled 100%)",
            target: Target::new(traced.api, "/v1/chat/completions"),
            pid: Some(traced.pid()),
        });
    }
    if let Some(baseline) = &baseline {
        sides.push(Side {
            name: "baseline proxy (--baseline)",
            target: Target::new(baseline.api, "/v1/chat/completions"),
            pid: Some(baseline.pid()),
        });
    }
    if let Some(tls) = &tls {
        sides.push(Side {
            name: "nginx → TLS h2 origin",
            target: Target::new(tls.nginx.addr, chat),
            pid: Some(tls.nginx.pid()),
        });
        sides.push(Side {
            name: "proxy → TLS h2 origin",
            target: Target::new(tls.proxy.api, "/v1/chat/completions"),
            pid: Some(tls.proxy.pid()),
        });
    }
    let started = Instant::now();

    let body = chat_body(false);
    let mut comparisons = Vec::new();
    for (i, &concurrency) in options.concurrency.iter().enumerate() {
        let requests = options.requests * (i + 1);
        eprintln!("latency: concurrency {concurrency}, {requests} requests per side ...");
        let label = format!("c={concurrency}");
        comparisons
            .push(compare(label, &sides, concurrency, requests, options.rounds, &body).await);
    }
    let requests = options.requests * 3;
    eprintln!(
        "saturation: concurrency {}, {requests} requests per side ...",
        options.saturation
    );
    let label = format!("saturation, c={}", options.saturation);
    let saturation = compare(
        label,
        &sides,
        options.saturation,
        requests,
        options.rounds,
        &body,
    )
    .await;
    // A cache hit against the mock's static answer (nginx does not cache: it forwards).
    eprintln!(
        "cache hits: concurrency 1, {} requests per side ...",
        options.requests
    );
    let cached = compare(
        "cache hit (nginx: forwarded), c=1".to_owned(),
        &sides,
        1,
        options.requests,
        options.rounds,
        &chat_body_for("cached", false),
    )
    .await;
    let proxy_rss_kib = proxy.status_kib("VmRSS");
    let proxy_hwm_kib = proxy.status_kib("VmHWM");
    let nginx_rss_kib = nginx.as_ref().map(|n| process_status_kib(n.pid(), "VmRSS"));

    let sse = if options.sse_streams > 0 {
        eprintln!(
            "SSE: {} streams x {} chunks, {} ms apart ...",
            options.sse_streams,
            options.sse_chunks,
            options.sse_interval.as_millis()
        );
        let spec = SseSpec {
            chunks: options.sse_chunks,
            interval: options.sse_interval,
            hold: false,
        };
        Some(compare_sse(&sides, options.sse_streams, spec, options.rounds).await)
    } else {
        None
    };
    drop((proxy, proxy_info, traced, baseline, nginx, tls));

    let mut memory = Vec::new();
    for &asked in &options.streams {
        let n = asked.min(stream_capacity());
        eprintln!("memory: {n} open streams through a fresh proxy ...");
        let mut result =
            memory_run(binary, mock, n, options.source_ips, options.worker_threads).await;
        result.asked = asked;
        memory.push(result);
    }

    print_heading(options, args, started);
    let mut table = Table {
        sides: sides.iter().map(|s| s.name).collect(),
        rows: Vec::new(),
    };
    let all = comparisons
        .into_iter()
        .chain([saturation, cached])
        .collect();
    closed_loop_rows(&mut table, &layout, all);
    table.row(
        "RSS after the request runs (peak)",
        memory_cells(&sides, &layout, proxy_rss_kib, proxy_hwm_kib, nginx_rss_kib),
        "proxy < 20 MiB",
        Some(proxy_rss_kib < 20 * 1024),
    );
    if let Some(mut sse) = sse {
        sse_rows(&mut table, &layout, options, &mut sse);
    }
    memory_rows(&mut table, sides.len(), layout.proxy, &memory);
    table.print();
    println!();
    println!(
        "Values in parentheses are what a side adds to the direct one at the same percentile. CPU \
         is the process's utime+stime (/proc/<pid>/stat, 10 ms ticks) over its rounds divided by \
         their requests. Memory is VmRSS (kernel socket buffers not included). Goals are those of \
         the performance work: the proxy against nginx in the same run."
    );
}

fn print_heading(options: &Options, args: &[String], started: Instant) {
    println!();
    println!("## Direct, nginx and the proxy in front of the same mock upstream, one run");
    println!();
    println!(
        "`cargo bench --bench load -- {}` on {} cores ({}), proxy with worker_threads = {}, nginx \
         with one worker and no master, {} rounds rotating the sides; finished in {:.0} s.",
        args.iter()
            .filter(|a| *a != "--bench")
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| format!("Linux {}", k.trim()))
            .unwrap_or_else(|_| "unknown kernel".into()),
        options.worker_threads,
        options.rounds,
        started.elapsed().as_secs_f64()
    );
    println!(
        "Non-streaming: POST /chat/completions (~400 B request, ~1 KB JSON answer; the proxy \
         routes `fast` and rewrites the model). Latency is per request over one keep-alive \
         HTTP/1.1 connection per client; load generator, mock, nginx and proxy share the machine."
    );
    println!();
}

/// Latency, throughput and CPU rows of the closed-loop scenarios.
fn closed_loop_rows(table: &mut Table, layout: &Layout, comparisons: Vec<Comparison>) {
    let sides = comparisons.first().map_or(0, |c| c.samples.len());
    let mut all_requests = vec![0usize; sides];
    let mut all_cpu = vec![Duration::ZERO; sides];
    for mut c in comparisons {
        let errors: usize = c.samples.iter().map(|s| s.errors).sum();
        assert_eq!(errors, 0, "{}: requests failed", c.label);
        for p in [50.0, 99.0] {
            let values: Vec<f64> = c.samples.iter_mut().map(|s| s.percentile(p)).collect();
            let added = |i: usize| values[i] - values[0];
            let goal = (c.concurrency == 1 && p == 50.0)
                .then_some(layout.nginx)
                .flatten()
                .map(|n| added(layout.proxy) <= added(n) + 5.0);
            let target = if goal.is_some() {
                "proxy adds ≤ nginx + 5 µs"
            } else {
                ""
            };
            table.latency(&format!("latency p{p}, {}", c.label), &values, target, goal);
        }
        let rates: Vec<f64> = c.samples.iter().map(Samples::rate).collect();
        let saturated = c.label.starts_with("saturation");
        let goal = layout
            .nginx
            .filter(|_| saturated)
            .map(|n| rates[layout.proxy] >= rates[n]);
        table.row(
            &format!("requests/s, {}", c.label),
            rates.iter().map(|r| format!("{r:.0}")).collect(),
            if goal.is_some() {
                "proxy ≥ nginx"
            } else {
                ""
            },
            goal,
        );
        for (i, cpu) in c.cpu.iter().enumerate() {
            all_requests[i] += c.samples[i].requests;
            all_cpu[i] += *cpu;
        }
    }
    let per_request: Vec<f64> = all_cpu
        .iter()
        .zip(&all_requests)
        .map(|(cpu, n)| cpu.as_secs_f64() * 1e6 / (*n).max(1) as f64)
        .collect();
    // Two goals in one row: each part says whether it is met, the row whether both are.
    let parts = layout.nginx.map(|n| {
        (
            per_request[layout.proxy] <= per_request[n],
            per_request[layout.proxy_info] <= 1.5 * per_request[n],
        )
    });
    let said = |met: bool| if met { "met" } else { "not met" };
    let text = match parts {
        Some((plain, info)) => format!(
            "proxy ≤ nginx ({}); with the info log ≤ 1.5 × nginx ({})",
            said(plain),
            said(info)
        ),
        None => "proxy ≤ nginx; with the info log ≤ 1.5 × nginx".to_owned(),
    };
    let mut cells = vec!["–".to_owned()];
    cells.extend(per_request[1..].iter().map(|v| us(*v)));
    table.row(
        &format!(
            "CPU per request (all {} requests of a side)",
            all_requests[0]
        ),
        cells,
        &text,
        parts.map(|(plain, info)| plain && info),
    );
}

fn memory_cells(
    sides: &[Side],
    layout: &Layout,
    rss: u64,
    hwm: u64,
    nginx_rss: Option<u64>,
) -> Vec<String> {
    (0..sides.len())
        .map(|i| match i {
            i if Some(i) == layout.nginx => nginx_rss.map(kib).unwrap_or_default(),
            i if i == layout.proxy => format!("{} ({})", kib(rss), kib(hwm)),
            _ => "–".to_owned(),
        })
        .collect()
}

fn sse_rows(table: &mut Table, layout: &Layout, options: &Options, sse: &mut [SseSamples]) {
    let label = format!(
        "{} streams x {} chunks",
        options.sse_streams, options.sse_chunks
    );
    for p in [50.0, 99.0] {
        let values: Vec<f64> = sse
            .iter_mut()
            .map(|s| s.chunk_delay.percentile(p))
            .collect();
        let goal = layout
            .nginx
            .filter(|_| p == 50.0)
            .map(|n| values[layout.proxy] - values[0] <= values[n] - values[0] + 1.0);
        let target = if goal.is_some() {
            "proxy adds ≤ nginx + 1 µs"
        } else {
            ""
        };
        table.latency(
            &format!("SSE event delay p{p} (send to arrival), {label}"),
            &values,
            target,
            goal,
        );
    }
    let values: Vec<f64> = sse
        .iter_mut()
        .map(|s| s.first_chunk.percentile(50.0))
        .collect();
    table.latency("SSE time to first event p50", &values, "", None);
}

fn memory_rows(table: &mut Table, sides: usize, proxy: usize, memory: &[MemoryResult]) {
    let cells = |value: String| {
        let mut cells = vec!["–".to_owned(); sides];
        cells[proxy] = value;
        cells
    };
    for m in memory {
        let label = format!("{} open streams", m.streams);
        if let Some(failure) = &m.failure {
            let text = format!("only {} opened: {failure}", m.opened);
            table.row(&format!("memory, {label}"), cells(text), "", Some(false));
            continue;
        }
        table.row(
            &format!("proxy memory per open stream, {label}"),
            cells(format!("{:.1} KiB", m.per_stream_kib())),
            "< 32 KiB",
            Some(m.per_stream_kib() < 32.0),
        );
        if m.streams < m.asked {
            let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
            let projected = m.rss_before_kib as f64 + m.per_stream_kib() * m.asked as f64;
            table.row(
                &format!(
                    "proxy RSS projected to {} streams ({} measured: the open-file limit of \
                     {soft} allows no more)",
                    m.asked, m.streams
                ),
                cells(kib(projected as u64)),
                "",
                None,
            );
        }
        table.row(
            &format!(
                "proxy RSS idle → with {label} (opened in {:.1} s)",
                m.open_time.as_secs_f64()
            ),
            cells(format!(
                "{} → {}",
                kib(m.rss_before_kib),
                kib(m.rss_after_kib)
            )),
            "",
            None,
        );
    }
}
