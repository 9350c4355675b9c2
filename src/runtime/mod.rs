//! The runtime: one immutable snapshot per loaded config (compiled routes, the upstream, the key,
//! inbound tokens), built off the request path and swapped in whole, and the reloader that
//! builds and swaps it. Nothing here knows the request pipeline; the pipeline reads a snapshot.

pub mod reload;
pub mod router;

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use crate::config::Config;
use crate::upstream::{BaseUrl, UpstreamClient};
use router::Router;

pub use reload::{ConfigOrigin, LiveConfig, ReloadLog, ReloadTrigger};

/// Everything a request needs from the config, compiled once per load.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    pub base_url: BaseUrl,
    /// `Bearer <key>`, marked sensitive so it never shows in debug output. `None` when no key is
    /// configured: requests then fail with 503 and `/readyz` reports it.
    pub api_key: Option<HeaderValue>,
    /// Where the key was looked for, for operators (never the key itself).
    pub api_key_source: String,
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Inbound tokens; empty when the proxy is open.
    pub tokens: crate::auth::Tokens,
    /// The pooled upstream client. Kept across reloads (with its warm connections) unless a
    /// setting it was built with changed.
    pub client: UpstreamClient,
    /// Which file and version this runtime was built from.
    pub origin: ConfigOrigin,
}

/// OpenRouter reads the app's title from `X-OpenRouter-Title`; older deployments send `X-Title`.
/// Whichever one the config sets is sent under both names.
const TITLE_HEADERS: [&str; 2] = ["x-title", "x-openrouter-title"];

impl Runtime {
    /// Compiles `config`. `previous` is the runtime being replaced, whose upstream client is reused
    /// when the connection settings are unchanged.
    pub fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, String> {
        let router = Router::compile(&config)?;
        let base_url = BaseUrl::parse(&config.upstream.base_url)
            .map_err(|e| format!("upstream.base_url: {e}"))?;
        let mut upstream_headers = Vec::new();
        for (name, value) in &config.upstream.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("upstream.headers: \"{name}\" is not a valid header name"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("upstream.headers.\"{name}\": not a valid header value"))?;
            upstream_headers.push((name, value));
        }
        let title = upstream_headers
            .iter()
            .find(|(name, _)| TITLE_HEADERS.contains(&name.as_str()))
            .cloned();
        if let Some((_, value)) = title {
            for alias in TITLE_HEADERS {
                if !upstream_headers
                    .iter()
                    .any(|(name, _)| name.as_str() == alias)
                {
                    upstream_headers.push((HeaderName::from_static(alias), value.clone()));
                }
            }
        }
        let tokens = crate::auth::Tokens::compile(&config)?;
        let (api_key, api_key_source) = read_api_key(&config);
        let client = match previous {
            Some(previous) if same_transport(&previous.config, &config) => previous.client.clone(),
            _ => crate::upstream::client(&config.upstream)?,
        };
        Ok(Runtime {
            client,
            config: Arc::new(config),
            router,
            base_url,
            api_key,
            api_key_source,
            upstream_headers,
            tokens,
            origin: ConfigOrigin::in_memory(),
        })
    }

    pub fn fallback_on_status(&self, status: u16) -> bool {
        self.config.fallback.on_status.contains(&status)
    }
}

fn same_transport(a: &Config, b: &Config) -> bool {
    a.upstream.connect_timeout == b.upstream.connect_timeout
        && a.upstream.pool_idle_timeout == b.upstream.pool_idle_timeout
}

/// Reads the key from `api_key_file` or the environment. A missing key is not a config error: the
/// proxy starts, reports not-ready, and picks the key up on the next reload.
fn read_api_key(config: &Config) -> (Option<HeaderValue>, String) {
    let (key, source) = match &config.upstream.api_key_file {
        Some(path) => {
            let source = format!("file {}", path.display());
            match std::fs::read_to_string(path) {
                Ok(text) => (Some(text), source),
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cannot read the API key file");
                    (None, source)
                }
            }
        }
        None => {
            let name = config.upstream.key_env();
            (
                std::env::var(name).ok(),
                format!("environment variable {name}"),
            )
        }
    };
    let key = key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty());
    let header = key.and_then(|key| match HeaderValue::from_str(&format!("Bearer {key}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            tracing::warn!(source = %source, "the API key contains characters not allowed in a header");
            None
        }
    });
    (header, source)
}

