//! The upstream registry: every upstream a route may send attempts to, by name, each with its
//! pooled client, its base URL, its key and the headers it adds. `[upstream]` is the one named
//! "default".

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Uri};

use crate::config::{BaseUrl, Config, UpstreamAuth, UpstreamConfig};
use crate::upstream::UpstreamClient;

/// The name `[upstream]` goes by in plans, metrics, logs and `x-proxy-upstream`.
pub const DEFAULT_UPSTREAM: &str = "default";

/// OpenRouter reads the app's title from `X-OpenRouter-Title`; older deployments send `X-Title`.
/// Whichever one the config sets is sent under both names.
const TITLE_HEADERS: [&str; 2] = ["x-title", "x-openrouter-title"];

/// One upstream, compiled from its config section.
pub struct Upstream {
    pub name: Arc<str>,
    pub base_url: BaseUrl,
    pub auth: UpstreamAuth,
    /// `Bearer <key>`, marked sensitive so it never shows in debug output. `None` when no key is
    /// configured: an attempt there fails with 503 and `/readyz` reports it.
    pub key: Option<HeaderValue>,
    /// Where the key was looked for, for operators (never the key itself).
    pub key_source: String,
    /// Added to every request sent here.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The pooled client. Kept across reloads (with its warm connections) unless a setting it was
    /// built with changed.
    pub client: UpstreamClient,
    config: UpstreamConfig,
}

impl Upstream {
    fn build(
        name: &str,
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
    ) -> Result<Upstream, String> {
        let base_url = BaseUrl::parse(&config.base_url).map_err(|e| format!("base_url: {e}"))?;
        let client = match previous {
            Some(previous) if same_transport(&previous.config, config) => previous.client.clone(),
            _ => crate::upstream::client(config)?,
        };
        let (key, key_source) = read_key(config);
        Ok(Upstream {
            name: Arc::from(name),
            base_url,
            auth: config.auth,
            key,
            key_source,
            headers: headers(config),
            client,
            config: config.clone(),
        })
    }

    /// Where a client path below `/v1` goes on this upstream.
    pub fn uri(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        self.base_url.join(rest, query)
    }

    /// The `Authorization` an attempt here carries: the proxy's key, or in pass-through mode the
    /// caller's own. `None` when there is none to send.
    pub fn credentials(&self, callers_key: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self.auth {
            UpstreamAuth::Inject => self.key.clone(),
            UpstreamAuth::Passthrough => callers_key.cloned(),
        }
    }

    /// Whether a request may be sent here at all (a key to inject, or callers bringing theirs).
    pub fn ready(&self) -> bool {
        self.auth == UpstreamAuth::Passthrough || self.key.is_some()
    }
}

/// Every upstream of one runtime.
pub struct Upstreams {
    all: Vec<Upstream>,
}

impl Upstreams {
    /// Compiles the upstreams of `config`, reusing the clients of `previous` where their
    /// connection settings did not change.
    pub fn build(config: &Config, previous: Option<&Upstreams>) -> Result<Upstreams, String> {
        let previous = previous.and_then(|p| p.get(DEFAULT_UPSTREAM));
        let default = Upstream::build(DEFAULT_UPSTREAM, &config.upstream, previous)
            .map_err(|e| format!("upstream.{e}"))?;
        Ok(Upstreams { all: vec![default] })
    }

    /// `[upstream]`.
    pub fn default_upstream(&self) -> &Upstream {
        &self.all[0]
    }

    pub fn get(&self, name: &str) -> Option<&Upstream> {
        self.all.iter().find(|u| &*u.name == name)
    }

    /// The position of `name` in the registry, as plans refer to it.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.all.iter().position(|u| &*u.name == name)
    }

    pub fn at(&self, index: usize) -> &Upstream {
        self.all.get(index).unwrap_or(&self.all[0])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.all.iter()
    }
}

fn same_transport(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    a.connect_timeout == b.connect_timeout && a.pool_idle_timeout == b.pool_idle_timeout
}

/// `headers` of the section, validated by the config already, with the title aliases added.
fn headers(config: &UpstreamConfig) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers: Vec<(HeaderName, HeaderValue)> = config
        .headers
        .iter()
        .filter_map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            Some((name, HeaderValue::from_str(value).ok()?))
        })
        .collect();
    let title = headers
        .iter()
        .find(|(name, _)| TITLE_HEADERS.contains(&name.as_str()))
        .map(|(_, value)| value.clone());
    if let Some(value) = title {
        for alias in TITLE_HEADERS {
            if !headers.iter().any(|(name, _)| name.as_str() == alias) {
                headers.push((HeaderName::from_static(alias), value.clone()));
            }
        }
    }
    headers
}

/// Reads the key from `api_key_file` or the environment. A missing key is not a config error: the
/// proxy starts, reports not-ready, and picks the key up on the next reload.
fn read_key(config: &UpstreamConfig) -> (Option<HeaderValue>, String) {
    let (key, source) = match &config.api_key_file {
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
            let name = config.key_env();
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
