//! The typed `proxy.toml` schema: defaults, parsing and validation with errors that name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod base_url;
mod batch;
mod error;
mod otel;
mod redis;
mod upstreams;
mod validate;

pub use base_url::BaseUrl;
pub use batch::BatchConfig;
pub use error::{ConfigError, Invalid, KeyPath};
pub use otel::OtelConfig;
pub use redis::{check_url, BudgetConfig, CacheTier2, RedisConfig, RedisUrlSource};
pub use validate::validate_tokens;

/// The route name reported for requests that no rule matched.
pub const DEFAULT_ROUTE: &str = "default";

/// The name `[upstream]` goes by in plans, metrics, logs and `x-proxy-upstream`.
pub const DEFAULT_UPSTREAM: &str = "default";

pub use upstreams::DEFAULT_BASE_URL;

/// The whole `proxy.toml`, validated.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    /// Further upstreams by name; `[upstream]` is the one named "default".
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub fallback: FallbackConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub routes: Vec<RouteConfig>,
    /// Traces; absent, no tracing work at all.
    pub otel: Option<OtelConfig>,
    /// State shared by every replica; absent, everything stays in-process.
    pub redis: Option<RedisConfig>,
    /// The Batch API served by the proxy; absent, its paths are forwarded upstream.
    pub batch: Option<BatchConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The OpenAI-compatible API, served under `/v1`.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// JSON request bodies above this size are refused with 413 (they are read whole, for routing
    /// and for replay on fallback). Compressed bodies count after decoding.
    pub max_body_bytes: usize,
    /// Other bodies (multipart uploads, audio, files) are streamed to the upstream as they arrive,
    /// never buffered, up to this size.
    pub max_upload_bytes: u64,
    /// A request body must arrive whole within this time after its head; a slower one gets 408.
    /// Streamed uploads must not pause longer than this between two reads.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// After refusing a body (413, 408), the rest the client is still sending is read and thrown
    /// away for up to this long, so that the client reads the answer instead of a reset.
    #[serde(with = "humantime_serde")]
    pub lingering_timeout: Duration,
    /// ... and up to this many bytes.
    pub lingering_bytes: u64,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long `/readyz` reports 503 before the listener stops accepting, so load balancers and
    /// Kubernetes endpoints can stop sending new traffic first.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// A client must send its whole request head within this time of connecting, or of its
    /// previous answer on a kept-alive connection (slowloris and idle-socket guard). Applies to the
    /// admin listener too.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Upper bound on open client connections. At the bound, connections with no request in
    /// flight are closed to make room; further connections wait in the accept queue.
    pub max_connections: usize,
    /// The same bound for the admin listener (probes and scrapes need few).
    pub admin_max_connections: usize,
    /// Bound on a request head (request line and headers); larger heads get 431.
    pub max_header_bytes: usize,
    /// Bound on the number of request headers; more get 431.
    pub max_headers: usize,
    /// Concurrent streams per HTTP/2 client connection.
    pub http2_max_concurrent_streams: u32,
    /// Threads serving requests: 1 runs everything on one thread (least overhead per request,
    /// suits a sidecar), N > 1 runs N threads with an event loop and upstream connections each,
    /// client connections spread over them, 0 one per CPU core (a shared gateway).
    pub worker_threads: usize,
    /// Inbound tokens: when any is configured, every request must carry one as
    /// `Authorization: Bearer <token>` (what OpenAI SDKs send as their `api_key`).
    pub tokens: Vec<TokenConfig>,
    /// A file of further `[[tokens]]` entries (same keys), e.g. a mounted Secret.
    pub token_file: Option<PathBuf>,
}

/// One inbound token, stored as the SHA-256 of the token (`openrouter-proxy --hash-token`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and metrics instead of the token.
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    /// Route names this token may use; empty means all.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Requested models (exact or glob) this token may ask for; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests of this token in flight at once; over it, 429.
    pub max_concurrent: Option<usize>,
    /// Sustained request rate of this token (bursts up to one minute's worth); over it, 429.
    pub requests_per_minute: Option<u32>,
    /// Spend of this token per UTC day and month, from the answers' `usage.cost`; over it, 429.
    pub budget: Option<BudgetConfig>,
}

/// The contents of `server.token_file`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 10 * 1024 * 1024,
            max_upload_bytes: 512 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            lingering_timeout: Duration::from_secs(5),
            lingering_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            admin_max_connections: 64,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            http2_max_concurrent_streams: 256,
            worker_threads: 1,
            tokens: Vec::new(),
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Any OpenAI-compatible base URL; `/v1/<rest>` is sent to `<base_url>/<rest>`.
    pub base_url: String,
    /// Several base URLs of one service instead of `base_url`: requests are spread over them
    /// (least in flight of two random choices), and a failing one is ejected for a while.
    pub endpoints: Vec<String>,
    /// A pool of keys instead of `api_key_env` / `api_key_file`: a weighted choice among the keys
    /// that are not out (rejected, out of credit or rate limited).
    pub keys: Vec<KeyConfig>,
    /// Environment variable holding the API key. Used when `api_key_file` is not set.
    pub api_key_env: Option<String>,
    /// File holding the API key (a mounted Kubernetes Secret); surrounding whitespace is ignored.
    pub api_key_file: Option<PathBuf>,
    /// `"inject"`: the proxy's key replaces whatever the client sends. `"passthrough"`: each
    /// client's own `Authorization` is forwarded (and cached answers are kept per caller).
    pub auth: UpstreamAuth,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request until the upstream's response head arrives.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Idle pooled upstream connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// A streaming answer that sends nothing (not even a keep-alive comment) for this long is
    /// treated as broken.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Added to every upstream request (after the client's headers, before route `set_headers`).
    pub headers: BTreeMap<String, String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            endpoints: Vec::new(),
            keys: Vec::new(),
            api_key_env: None,
            api_key_file: None,
            auth: UpstreamAuth::Inject,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            stream_idle_timeout: Duration::from_secs(120),
            headers: BTreeMap::new(),
        }
    }
}

impl UpstreamConfig {
    /// The environment variable the key is read from when no key file is configured.
    pub fn key_env(&self) -> &str {
        self.api_key_env.as_deref().unwrap_or(DEFAULT_KEY_ENV)
    }
}

pub const DEFAULT_KEY_ENV: &str = "OPENROUTER_API_KEY";

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuth {
    #[default]
    Inject,
    Passthrough,
    /// No `Authorization` at all (an in-cluster server that needs none).
    None,
}

/// One key of an upstream's pool.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// How logs and metrics name the key (its position in the pool when absent); never its value.
    pub name: Option<String>,
    /// Environment variable holding the key.
    pub env: Option<String>,
    /// File holding the key (a mounted Secret), re-read when it changes.
    pub file: Option<PathBuf>,
    /// Share of the requests this key takes among the keys that are up.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// Upstream statuses that move on to the next model in the chain.
    pub on_status: Vec<u16>,
    /// Cap on upstream attempts per request, counting the first.
    pub max_attempts: usize,
    /// A 429 whose `Retry-After` is at most this long is retried on the same model after the
    /// wait; a longer one moves on to the next model at once.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// After `cooldown_failures` failures in a row, a model is skipped for this long, then one
    /// probe request decides whether it is back. `"0s"` turns passive health checks off.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    pub cooldown_failures: u32,
    /// Non-streaming answers are read up to this size to look for OpenRouter's "unavailable"
    /// errors sent with status 200; larger answers are relayed without the check.
    pub max_inspect_bytes: usize,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            on_status: vec![500, 502, 503, 504],
            max_attempts: 3,
            retry_after_max: Duration::from_secs(2),
            cooldown: Duration::from_secs(30),
            cooldown_failures: 3,
            max_inspect_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bound on the bytes of stored responses.
    pub max_bytes: u64,
    /// Answers larger than this are not stored.
    pub max_entry_bytes: usize,
    /// A second tier behind the in-memory one, shared by every replica (needs `[redis]`).
    pub tier2: Option<CacheTier2>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 4 * 1024 * 1024,
            tier2: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `openrouter_proxy=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// JSON access lines are gathered up to this many bytes and written together (one write for
    /// many requests, as nginx's `access_log ... buffer=`); 0 writes each line as it comes.
    pub access_buffer_bytes: usize,
    /// Gathered access lines are written at least this often, and when the proxy stops.
    #[serde(with = "humantime_serde")]
    pub access_flush_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".to_owned(),
            access_buffer_bytes: 64 * 1024,
            access_flush_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct model names that clients chose (on routes that keep the requested model) kept as
    /// `model`, `from` and `to` label values; later names are counted as `other`. Models a route
    /// names (`model`, `fallbacks`, exact `match.model`) never count against it.
    pub max_model_labels: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_model_labels: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// The model sent upstream; absent means the requested model is kept.
    pub model: Option<String>,
    /// The upstream the route's attempts go to (`model`, and fallbacks naming no upstream);
    /// absent: the default upstream.
    pub upstream: Option<String>,
    /// Attempts made in order after `model` fails: a model (on the route's upstream), or
    /// `{ upstream = "name", model = "..." }`.
    #[serde(default)]
    pub fallbacks: Vec<FallbackTarget>,
    /// Merged into the JSON body after the model rewrite (objects key by key, as a JSON merge
    /// patch; other values replace).
    pub set_body: Option<toml::Value>,
    /// Merged only where the client did not set the field (defaults such as `max_tokens`).
    pub default_body: Option<toml::Value>,
    /// Top-level fields removed from the JSON body.
    #[serde(default)]
    pub unset_body: Vec<String>,
    /// Absent or zero: answers on this route are not cached.
    #[serde(default, with = "humantime_serde::option")]
    pub cache_ttl: Option<Duration>,
    /// Overrides `[upstream] first_byte_timeout` for this route.
    #[serde(default, with = "humantime_serde::option")]
    pub first_byte_timeout: Option<Duration>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_headers: Vec<String>,
    /// What happens when a stream breaks after content has reached the client.
    #[serde(default)]
    pub on_midstream: Midstream,
    /// Requests on this route in flight at once; over it, 429.
    pub max_concurrent: Option<usize>,
    /// Sustained request rate on this route (bursts up to one minute's worth); over it, 429.
    pub requests_per_minute: Option<u32>,
    /// Spend on this route per UTC day and month, from the answers' `usage.cost`; over it, 429.
    pub budget: Option<BudgetConfig>,
}

/// A fallback of a route: a model on the route's upstream, or a model on a named upstream.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FallbackTarget {
    Model(String),
    On {
        upstream: Option<String>,
        model: String,
    },
}

impl FallbackTarget {
    pub fn model(&self) -> &str {
        match self {
            FallbackTarget::Model(model) | FallbackTarget::On { model, .. } => model,
        }
    }

    /// The upstream named for this fallback, if any (otherwise the route's).
    pub fn upstream(&self) -> Option<&str> {
        match self {
            FallbackTarget::Model(_) => None,
            FallbackTarget::On { upstream, .. } => upstream.as_deref(),
        }
    }
}

/// The answer to a stream that breaks after content has reached the client.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Midstream {
    /// End the stream with an OpenAI-shaped SSE error event, so SDKs raise.
    #[default]
    Error,
    /// Continue on the next model with the partial answer as an assistant prefix.
    Resume,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Exact model name, or a glob with `*` and `?` (`openai/*`). Absent matches every model.
    pub model: Option<String>,
    /// Request path below `/v1`, exact or glob (`/v1/embeddings`, `/v1/*`).
    pub path: Option<String>,
    /// Header name to exact value (or glob); every listed header must match.
    pub headers: BTreeMap<String, String>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(path, format!("cannot read: {e}")))?;
        Config::parse(&text).map_err(|error| error.in_file(path))
    }

    /// Parses and validates config text. The error names the line, column and key, never a
    /// value.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::toml(text, &e))?;
        config
            .validate()
            .map_err(|invalid| ConfigError::invalid(text, invalid))?;
        Ok(config)
    }
}

/// Humantime durations (`"30s"`, `"1m 30s"`, `"250ms"`) for serde.
mod humantime_serde {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration: {e} (write it like 250ms, 30s or 5m)"
            ))
        })
    }

    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.upstream.key_env(), "OPENROUTER_API_KEY");
        assert_eq!(config.fallback.max_attempts, 3);
        assert!(config.routes.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert_eq!((err.line, err.column), (Some(3), Some(1)));
        assert_eq!(err.key.as_deref(), Some("server.lisen"));
        let err = err.to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[upstream]\nconnect_timeout = \"soon\"", "invalid duration"),
            ("[upstream]\nbase_url = \"ftp://x\"", "upstream.base_url"),
            ("[fallback]\nmax_attempts = 0", "fallback.max_attempts"),
            ("[fallback]\non_status = [200]", "fallback.on_status"),
            (
                "[[routes]]\nname = \"a\"\n[[routes]]\nname = \"a\"",
                "duplicate route name",
            ),
            (
                "[[routes]]\nname = \"a\"\nset_headers = { \"bad header\" = \"x\" }",
                "set_headers",
            ),
            (
                "[upstream]\napi_key_env = \"A\"\napi_key_file = \"/k\"",
                "api_key_file",
            ),
            ("[server]\nmax_body_bytes = -1", "max_body_bytes"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn validation_errors_name_the_line_and_key() {
        let text = "[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nfallbacks = [\"x\"]\n";
        let err = Config::parse(text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("routes[1].fallbacks"));
        assert_eq!(err.line, Some(6));
        assert!(err.reason.contains("route \"b\""), "{err}");
    }

    #[test]
    fn errors_never_show_a_value() {
        let secret = "sk-or-v1-0123456789abcdef";
        let cases = [
            format!("[upstream.headers]\nAuthorization = \"Bearer {secret}\nx = 1\n"),
            format!("[upstream]\nheaders = {{ Authorization = \"Bearer {secret}\" \n"),
            format!("[server]\nmax_body_bytes = \"{secret}\"\n"),
            format!("[upstream]\nconnect_timeout = \"{secret}\"\n"),
            format!("[upstream.headers]\n\"x-key\" = \"{secret}\\u0000\"\n"),
            format!("[upstream]\nbase_url = \"https://openrouter.ai/{secret} x\"\n"),
        ];
        for text in cases {
            let err = Config::parse(&text).unwrap_err();
            let shown = err.to_string();
            assert!(
                !shown.contains(secret),
                "{text:?} showed the value: {shown}"
            );
            assert!(err.line.is_some(), "{text:?}: {shown}");
            assert!(err.key.is_some(), "{text:?}: {shown}");
        }
    }

    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
        let config = Config::load(&path).unwrap();
        assert!(!config.routes.is_empty());
    }
}
