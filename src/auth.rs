//! Inbound access control: tokens kept only as SHA-256 hashes and compared in constant time, each
//! with a name for logs and metrics, allowed routes and models, and limits of its own; and the
//! headers a client's own key may come in.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::config::{validate_tokens, Config, ConfigError, KeyPath, TokenConfig, TokenFile};
use crate::error::ProxyError;
use crate::pattern::Pattern;

/// A compiled inbound token.
#[derive(Debug)]
pub struct Token {
    pub name: Arc<str>,
    digest: [u8; 32],
    routes: Vec<String>,
    models: Vec<Pattern>,
    pub max_concurrent: Option<usize>,
    pub requests_per_minute: Option<u32>,
    /// What the token's limits are called in errors and shared counters: `token "<name>"`.
    pub limit_scope: String,
    pub budget: Option<crate::config::BudgetConfig>,
}

impl Token {
    fn compile(config: &TokenConfig) -> Result<Token, String> {
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = config
                .sha256
                .get(2 * i..2 * i + 2)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("token \"{}\": sha256 is not 64 hex digits", config.name))?;
        }
        Ok(Token {
            name: Arc::from(config.name.as_str()),
            digest,
            routes: config.routes.clone(),
            models: config.models.iter().map(|m| Pattern::new(m)).collect(),
            max_concurrent: config.max_concurrent,
            requests_per_minute: config.requests_per_minute,
            limit_scope: format!("token \"{}\"", config.name),
            budget: config.budget,
        })
    }

    /// Whether this token may use `route` for `model`.
    pub fn allows(&self, route: &str, model: Option<&str>) -> Result<(), ProxyError> {
        if !self.routes.is_empty() && !self.routes.iter().any(|r| r == route) {
            return Err(ProxyError::Forbidden(format!("route \"{route}\"")));
        }
        if !self.models.is_empty() {
            let allowed = model.is_some_and(|m| self.models.iter().any(|p| p.matches(m)));
            if !allowed {
                return Err(ProxyError::Forbidden(format!(
                    "model \"{}\"",
                    model.unwrap_or("")
                )));
            }
        }
        Ok(())
    }
}

/// The configured tokens; empty means the proxy is open (the sidecar shape, on loopback).
#[derive(Debug, Default)]
pub struct Tokens(Vec<Arc<Token>>);

impl Tokens {
    /// Compiles `[[server.tokens]]` plus the entries of `server.token_file`.
    pub fn compile(config: &Config) -> Result<Tokens, String> {
        let mut entries = config.server.tokens.clone();
        if let Some(path) = &config.server.token_file {
            entries.extend(read_token_file(path).map_err(|e| format!("server.token_file: {e}"))?);
        }
        validate_tokens(&entries, KeyPath::new("tokens")).map_err(|invalid| {
            format!(
                "{}: {} (config and token file together)",
                invalid.key, invalid.reason
            )
        })?;
        entries
            .iter()
            .map(|entry| Token::compile(entry).map(Arc::new))
            .collect::<Result<_, _>>()
            .map(Tokens)
    }

    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// The caller's token from `Authorization: Bearer <token>`. `Ok(None)` when no tokens are
    /// configured. Every configured hash is compared, in constant time, whatever matches.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<Token>>, ProxyError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ProxyError::Unauthorized)?;
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for token in &self.0 {
            if constant_time_eq(&token.digest, &digest) {
                found = Some(token);
            }
        }
        found.cloned().map(Some).ok_or(ProxyError::Unauthorized)
    }

    /// The token named `name` (a batch line runs as the token that submitted it).
    pub fn named(&self, name: &str) -> Option<Arc<Token>> {
        self.0.iter().find(|token| &*token.name == name).cloned()
    }
}

/// The entries of a token file, validated on their own, with errors placed in that file.
fn read_token_file(path: &std::path::Path) -> Result<Vec<TokenConfig>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::file(path, format!("cannot read: {e}")))?;
    let file: TokenFile =
        toml::from_str(&text).map_err(|e| ConfigError::toml(&text, &e).in_file(path))?;
    validate_tokens(&file.tokens, KeyPath::new("tokens"))
        .map_err(|invalid| ConfigError::invalid(&text, invalid).in_file(path))?;
    Ok(file.tokens)
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The headers a client may carry a key in (OpenAI's SDKs, Anthropic's, Azure's). The upstream
/// gets exactly one credential, the one the proxy chose, never a client's next to it.
static CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

pub fn is_credential(name: &HeaderName) -> bool {
    CREDENTIAL_HEADERS.contains(name)
}

/// A pass-through caller's own key: its `Authorization`, or its `x-api-key` (what Anthropic's
/// SDKs and Claude Code send) as a bearer token, marked sensitive like the proxy's own key.
pub fn callers_key(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(authorization) = headers.get(header::AUTHORIZATION) {
        return Some(authorization.clone());
    }
    let key = headers.get(&X_API_KEY)?.to_str().ok()?.trim();
    if key.is_empty() {
        return None;
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lowercase hex, for `--hash-token`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Tokens {
        Tokens::compile(&Config::parse(text).unwrap()).unwrap()
    }

    #[test]
    fn hashes_and_checks() {
        let hash = hex(&sha256(b"secret-a"));
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let tokens = tokens(&format!(
            "[[server.tokens]]\nname = \"a\"\nsha256 = \"{hash}\"\nroutes = [\"fast\"]\nmodels = [\"openai/*\"]\n"
        ));
        let mut headers = HeaderMap::new();
        assert!(matches!(
            tokens.authenticate(&headers),
            Err(ProxyError::Unauthorized)
        ));
        headers.insert(header::AUTHORIZATION, "Bearer secret-b".parse().unwrap());
        assert!(matches!(
            tokens.authenticate(&headers),
            Err(ProxyError::Unauthorized)
        ));
        headers.insert(header::AUTHORIZATION, "Bearer secret-a".parse().unwrap());
        let token = tokens.authenticate(&headers).unwrap().unwrap();
        assert_eq!(&*token.name, "a");
        assert!(token.allows("fast", Some("openai/gpt-4o")).is_ok());
        assert!(token.allows("slow", Some("openai/gpt-4o")).is_err());
        assert!(token.allows("fast", Some("anthropic/x")).is_err());
        assert!(Tokens::default().authenticate(&headers).unwrap().is_none());
    }
}
