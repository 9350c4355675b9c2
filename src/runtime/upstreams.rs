//! The upstream registry: every upstream a route may send attempts to, by name, each with its
//! pooled client, its endpoints, its key pool and the headers it adds. `[upstream]` is the one
//! named "default".

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};

use super::pool::{Endpoint, Key, Pick};
use crate::config::{BaseUrl, Config, UpstreamAuth, UpstreamConfig};
use crate::upstream::UpstreamClient;

pub use crate::config::DEFAULT_UPSTREAM;

/// OpenRouter reads the app's title from `X-OpenRouter-Title`; older deployments send `X-Title`.
/// Whichever one the config sets is sent under both names.
const TITLE_HEADERS: [&str; 2] = ["x-title", "x-openrouter-title"];

/// One upstream, compiled from its config section.
pub struct Upstream {
    pub name: Arc<str>,
    /// The name as the `x-proxy-upstream` answer header carries it (made once).
    pub name_header: Option<HeaderValue>,
    /// `gen_ai.provider.name` on trace spans (see [`provider_of`]).
    pub provider: Arc<str>,
    pub auth: UpstreamAuth,
    /// Where requests go: `base_url`, or each of `endpoints`.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The keys injected in `auth = "inject"` mode: `keys`, or the one key of `api_key_env` /
    /// `api_key_file`.
    pub keys: Vec<Key>,
    /// Added to every request sent here.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub first_byte_timeout: Duration,
    pub stream_idle_timeout: Duration,
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
        let urls: Vec<&str> = if config.endpoints.is_empty() {
            vec![config.base_url.as_str()]
        } else {
            config.endpoints.iter().map(String::as_str).collect()
        };
        let endpoints = urls
            .into_iter()
            .map(|url| BaseUrl::parse(url).map(|base| Arc::new(Endpoint::new(url, base))))
            .collect::<Result<_, _>>()?;
        let client = match previous {
            Some(previous) if same_transport(&previous.config, config) => previous.client.clone(),
            _ => crate::upstream::client(config)?,
        };
        let keys = match config.auth {
            UpstreamAuth::Inject => Key::pool(name, config),
            UpstreamAuth::Passthrough | UpstreamAuth::None => Vec::new(),
        };
        let host = urls_host(config);
        Ok(Upstream {
            name: Arc::from(name),
            name_header: HeaderValue::from_str(name).ok(),
            provider: Arc::from(provider_of(host.as_deref(), name)),
            auth: config.auth,
            endpoints,
            keys,
            headers: headers(config),
            first_byte_timeout: config.first_byte_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            client,
            config: config.clone(),
        })
    }

    /// Whether requests can be sent here at all: a key to inject, or none needed.
    pub fn ready(&self) -> bool {
        self.auth != UpstreamAuth::Inject || self.keys.iter().any(Key::present)
    }

    /// Where the keys are read from, for operators (never a key).
    pub fn key_sources(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.source.clone()).collect()
    }

    /// Chooses an endpoint (least in flight of two random choices among those not ejected) and,
    /// in inject mode, a key (weighted among those not out), avoiding the ones in `tried`.
    /// `callers_key` is the credential in pass-through mode. `None` when no key is left.
    pub fn pick(
        &self,
        callers_key: Option<&HeaderValue>,
        tried: &Tried,
        now: Instant,
    ) -> Option<Pick<'_>> {
        let endpoint = super::pool::choose_endpoint(&self.endpoints, &tried.endpoints, now);
        let (key, credentials) = match self.auth {
            UpstreamAuth::Inject => {
                let key = super::pool::choose_key(&self.keys, &tried.keys, now)?;
                (Some(key), key.value.clone())
            }
            UpstreamAuth::Passthrough => (None, Some(callers_key?.clone())),
            UpstreamAuth::None => (None, None),
        };
        Some(Pick {
            endpoint,
            key,
            credentials,
        })
    }

    /// Whether an attempt here has what it needs to be sent (a key, or the caller's own).
    pub fn reachable(&self, callers_key: Option<&HeaderValue>) -> bool {
        match self.auth {
            UpstreamAuth::Inject => self.keys.iter().any(Key::present),
            UpstreamAuth::Passthrough => callers_key.is_some(),
            UpstreamAuth::None => true,
        }
    }
}

/// The host of an upstream's first URL.
fn urls_host(config: &UpstreamConfig) -> Option<String> {
    let url = config.endpoints.first().unwrap_or(&config.base_url);
    let uri = url.parse::<http::Uri>().ok()?;
    uri.host().map(str::to_ascii_lowercase)
}

/// The GenAI provider an upstream's host belongs to: `openrouter`, `anthropic`, `openai`, or
/// else the upstream's own name in the config.
pub fn provider_of<'a>(host: Option<&str>, name: &'a str) -> &'a str {
    let within =
        |domain: &str| host.is_some_and(|h| h == domain || h.ends_with(&format!(".{domain}")));
    if within("openrouter.ai") {
        "openrouter"
    } else if within("anthropic.com") {
        "anthropic"
    } else if within("openai.com") {
        "openai"
    } else {
        name
    }
}

/// What one attempt already tried on an upstream (positions in its endpoints and keys).
#[derive(Debug, Default)]
pub struct Tried {
    pub endpoints: Vec<usize>,
    pub keys: Vec<usize>,
}

/// Every upstream of one runtime.
pub struct Upstreams {
    all: Vec<Upstream>,
}

impl Upstreams {
    /// Compiles the upstreams of `config`, reusing the clients of `previous` where their
    /// connection settings did not change.
    pub fn build(config: &Config, previous: Option<&Upstreams>) -> Result<Upstreams, String> {
        let all = config
            .all_upstreams()
            .map(|(name, section)| {
                let previous = previous.and_then(|p| p.get(name));
                Upstream::build(name, section, previous)
                    .map_err(|e| format!("upstream {name}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Upstreams { all })
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

#[cfg(test)]
mod tests {
    use super::provider_of;

    #[test]
    fn providers_by_host() {
        for (host, provider) in [
            (Some("openrouter.ai"), "openrouter"),
            (Some("eu.openrouter.ai"), "openrouter"),
            (Some("api.anthropic.com"), "anthropic"),
            (Some("api.openai.com"), "openai"),
            (Some("notopenai.com"), "backup"),
            (Some("127.0.0.1"), "backup"),
            (None, "backup"),
        ] {
            assert_eq!(provider_of(host, "backup"), provider, "{host:?}");
        }
    }
}
