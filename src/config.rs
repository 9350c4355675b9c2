//! The typed `proxy.toml` schema: defaults, parsing and validation with errors that name the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A config that could not be loaded: which file, and what is wrong (with the key and line where
/// the TOML parser knows them).
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The whole `proxy.toml`, validated.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub fallback: FallbackConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub routes: Vec<RouteConfig>,
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
    /// suits a sidecar), N > 1 uses N worker threads, 0 one per CPU core (a shared gateway).
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
            base_url: "https://openrouter.ai/api/v1".to_owned(),
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
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 4 * 1024 * 1024,
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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".to_owned(),
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
    /// Models tried in order after `model` fails.
    #[serde(default)]
    pub fallbacks: Vec<String>,
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|reason| ConfigError {
            file: path.to_owned(),
            reason,
        })
    }

    /// Parses and validates config text. The error names the key (and line, for parse errors).
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err("server.admin_listen: must differ from server.listen".into());
        }
        positive(s.max_body_bytes as u64, "server.max_body_bytes")?;
        positive(s.max_connections as u64, "server.max_connections")?;
        positive(
            s.admin_max_connections as u64,
            "server.admin_max_connections",
        )?;
        positive(s.max_upload_bytes, "server.max_upload_bytes")?;
        nonzero(s.body_read_timeout, "server.body_read_timeout")?;
        nonzero(s.header_read_timeout, "server.header_read_timeout")?;
        if s.max_header_bytes < 8192 {
            return Err(format!(
                "server.max_header_bytes: must be at least 8192, got {}",
                s.max_header_bytes
            ));
        }
        positive(s.max_headers as u64, "server.max_headers")?;
        if s.worker_threads > 1024 {
            return Err(format!(
                "server.worker_threads: at most 1024, got {}",
                s.worker_threads
            ));
        }
        positive(
            u64::from(s.http2_max_concurrent_streams),
            "server.http2_max_concurrent_streams",
        )?;
        validate_tokens(&s.tokens, "server.tokens")?;
        if self.upstream.auth == UpstreamAuth::Passthrough
            && (!s.tokens.is_empty() || s.token_file.is_some())
        {
            return Err("server.tokens: inbound tokens and upstream.auth = \"passthrough\" both use the Authorization header; choose one".into());
        }

        let u = &self.upstream;
        crate::upstream::BaseUrl::parse(&u.base_url)
            .map_err(|e| format!("upstream.base_url: {e}"))?;
        if u.api_key_env.is_some() && u.api_key_file.is_some() {
            return Err(
                "upstream.api_key_file: set either api_key_env or api_key_file, not both".into(),
            );
        }
        if u.api_key_env.as_deref() == Some("") {
            return Err("upstream.api_key_env: must not be empty".into());
        }
        nonzero(u.connect_timeout, "upstream.connect_timeout")?;
        nonzero(u.first_byte_timeout, "upstream.first_byte_timeout")?;
        for (name, value) in &u.headers {
            header_pair(name, value, &format!("upstream.headers.\"{name}\""))?;
        }

        let f = &self.fallback;
        if f.max_attempts == 0 || f.max_attempts > 10 {
            return Err(format!(
                "fallback.max_attempts: must be between 1 and 10, got {}",
                f.max_attempts
            ));
        }
        for status in &f.on_status {
            if !(400..=599).contains(status) {
                return Err(format!(
                    "fallback.on_status: {status} is not an HTTP error status (400-599)"
                ));
            }
        }
        if f.cooldown_failures == 0 {
            return Err("fallback.cooldown_failures: must be at least 1".into());
        }
        positive(f.max_inspect_bytes as u64, "fallback.max_inspect_bytes")?;
        nonzero(u.stream_idle_timeout, "upstream.stream_idle_timeout")?;
        positive(self.cache.max_bytes, "cache.max_bytes")?;
        positive(self.cache.max_entry_bytes as u64, "cache.max_entry_bytes")?;
        if self.log.level.trim().is_empty() {
            return Err("log.level: must not be empty".into());
        }
        if self.metrics.max_model_labels > 10_000 {
            return Err(format!(
                "metrics.max_model_labels: must be at most 10000, got {}",
                self.metrics.max_model_labels
            ));
        }

        let mut names = std::collections::HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if route.name.trim().is_empty() {
                return Err(format!("{at}.name: must not be empty"));
            }
            if !names.insert(route.name.as_str()) {
                return Err(format!(
                    "{at}.name: duplicate route name \"{}\"",
                    route.name
                ));
            }
            let at = format!("routes[{i}] (\"{}\")", route.name);
            for model in route.model.iter().chain(&route.fallbacks) {
                if model.trim().is_empty() {
                    return Err(format!("{at}.model: model names must not be empty"));
                }
            }
            if route.model.is_none() && !route.fallbacks.is_empty() {
                return Err(format!("{at}.fallbacks: needs `model` to be set as well"));
            }
            if let Some(timeout) = route.first_byte_timeout {
                nonzero(timeout, &format!("{at}.first_byte_timeout"))?;
            }
            limits(route.max_concurrent, route.requests_per_minute, &at)?;
            if let Some(path) = &route.matcher.path {
                if !path.starts_with("/v1") {
                    return Err(format!(
                        "{at}.match.path: must start with /v1, got \"{path}\""
                    ));
                }
            }
        }
        crate::router::Router::compile(self)?;
        Ok(())
    }
}

/// `line 3 (`lisen = 3`): unknown field `lisen`, expected one of ...`: the line, its text (which
/// names the key) and the reason, on one line for logs.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let reason = error.message().trim();
    let Some(span) = error.span() else {
        return reason.to_owned();
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let source = text[line_start..line_end].trim();
    format!("line {line} (`{source}`): {reason}")
}

/// Checks `[[server.tokens]]` (or a token file's `[[tokens]]`, under the prefix `at`).
pub fn validate_tokens(tokens: &[TokenConfig], at: &str) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let at = format!("{at}[{i}]");
        if token.name.trim().is_empty() {
            return Err(format!("{at}.name: must not be empty"));
        }
        if !names.insert(token.name.as_str()) {
            return Err(format!(
                "{at}.name: duplicate token name \"{}\"",
                token.name
            ));
        }
        let hex = token.sha256.len() == 64 && token.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex {
            return Err(format!(
                "{at}.sha256: must be the 64 hex digits of the token's SHA-256 (see openrouter-proxy --hash-token)"
            ));
        }
        limits(token.max_concurrent, token.requests_per_minute, &at)?;
    }
    Ok(())
}

fn limits(concurrent: Option<usize>, per_minute: Option<u32>, at: &str) -> Result<(), String> {
    if concurrent == Some(0) {
        return Err(format!(
            "{at}.max_concurrent: must be at least 1 (omit it for no limit)"
        ));
    }
    if per_minute == Some(0) {
        return Err(format!(
            "{at}.requests_per_minute: must be at least 1 (omit it for no limit)"
        ));
    }
    Ok(())
}

fn positive(value: u64, key: &str) -> Result<(), String> {
    if value == 0 {
        return Err(format!("{key}: must be greater than 0"));
    }
    Ok(())
}

fn nonzero(value: Duration, key: &str) -> Result<(), String> {
    if value.is_zero() {
        return Err(format!("{key}: must be longer than 0s"));
    }
    Ok(())
}

fn header_pair(name: &str, value: &str, key: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{key}: \"{name}\" is not a valid header name"))?;
    http::HeaderValue::from_str(value)
        .map_err(|_| format!("{key}: value is not a valid header value"))?;
    Ok(())
}

/// Humantime durations (`"30s"`, `"1m 30s"`, `"250ms"`) for serde.
mod humantime_serde {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration \"{text}\": {e} (use e.g. \"30s\", \"5m\")"
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
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[upstream]\nconnect_timeout = \"soon\"", "soon"),
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
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
        let config = Config::load(&path).unwrap();
        assert!(!config.routes.is_empty());
    }
}
