//! Checks on a parsed config that its types alone cannot express: ranges, exclusive keys, names,
//! headers, URLs. Each failure names its key; none quotes a value that may be secret.

use std::collections::HashSet;
use std::time::Duration;

use super::error::{Invalid, KeyPath};
use super::{Config, LogConfig, RouteConfig, ServerConfig, TokenConfig, UpstreamAuth};

pub(super) type Checked = Result<(), Invalid>;

impl Config {
    pub(crate) fn validate(&self) -> Checked {
        validate_server(&self.server)?;
        let passthrough = self
            .all_upstreams()
            .any(|(_, u)| u.auth == UpstreamAuth::Passthrough);
        if passthrough && (!self.server.tokens.is_empty() || self.server.token_file.is_some()) {
            return Err(Invalid::new(
                KeyPath::new("server.tokens"),
                "inbound tokens and upstream.auth = \"passthrough\" both use the Authorization header; choose one",
            ));
        }
        self.validate_upstreams()?;
        self.validate_fallback()?;
        self.batch
            .as_ref()
            .map_or(Ok(()), |batch| batch.validate())?;
        positive(self.cache.max_bytes, "cache.max_bytes")?;
        positive(self.cache.max_entry_bytes as u64, "cache.max_entry_bytes")?;
        super::redis::validate_redis(self.redis.as_ref(), self.cache.tier2)?;
        validate_log(&self.log)?;
        if self.metrics.max_model_labels > 10_000 {
            return Err(Invalid::new(
                KeyPath::new("metrics.max_model_labels"),
                format!(
                    "must be at most 10000, got {}",
                    self.metrics.max_model_labels
                ),
            ));
        }
        self.otel
            .as_ref()
            .map_or(Ok(()), super::OtelConfig::validate)?;
        let mut names = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = KeyPath::new("routes").index(i);
            if !names.insert(route.name.as_str()) {
                return Err(Invalid::new(
                    at.key("name"),
                    format!("duplicate route name \"{}\"", route.name),
                ));
            }
            validate_route(route, at.clone())?;
            super::upstreams::validate_route_targets(self, route, &at)?;
        }
        Ok(())
    }

    fn validate_fallback(&self) -> Checked {
        let f = &self.fallback;
        if f.max_attempts == 0 || f.max_attempts > 10 {
            return Err(Invalid::new(
                KeyPath::new("fallback.max_attempts"),
                format!("must be between 1 and 10, got {}", f.max_attempts),
            ));
        }
        if let Some(status) = f.on_status.iter().find(|s| !(400..=599).contains(*s)) {
            return Err(Invalid::new(
                KeyPath::new("fallback.on_status"),
                format!("{status} is not an HTTP error status (400-599)"),
            ));
        }
        if f.cooldown_failures == 0 {
            return Err(Invalid::new(
                KeyPath::new("fallback.cooldown_failures"),
                "must be at least 1",
            ));
        }
        positive(f.max_inspect_bytes as u64, "fallback.max_inspect_bytes")
    }
}

fn validate_server(s: &ServerConfig) -> Checked {
    if s.listen == s.admin_listen && s.listen.port() != 0 {
        return Err(Invalid::new(
            KeyPath::new("server.admin_listen"),
            "must differ from server.listen",
        ));
    }
    positive(s.max_body_bytes as u64, "server.max_body_bytes")?;
    positive(s.max_upload_bytes, "server.max_upload_bytes")?;
    positive(s.max_connections as u64, "server.max_connections")?;
    positive(
        s.admin_max_connections as u64,
        "server.admin_max_connections",
    )?;
    nonzero(
        s.header_read_timeout,
        &KeyPath::new("server.header_read_timeout"),
    )?;
    nonzero(
        s.body_read_timeout,
        &KeyPath::new("server.body_read_timeout"),
    )?;
    if s.max_header_bytes < 8192 {
        return Err(Invalid::new(
            KeyPath::new("server.max_header_bytes"),
            format!("must be at least 8192, got {}", s.max_header_bytes),
        ));
    }
    positive(s.max_headers as u64, "server.max_headers")?;
    if s.worker_threads > 1024 {
        return Err(Invalid::new(
            KeyPath::new("server.worker_threads"),
            format!("at most 1024, got {}", s.worker_threads),
        ));
    }
    positive(
        u64::from(s.http2_max_concurrent_streams),
        "server.http2_max_concurrent_streams",
    )?;
    validate_tokens(&s.tokens, KeyPath::new("server.tokens"))
}

/// The largest access-log buffer: lines wait in memory until it fills or its interval passes.
const MAX_ACCESS_BUFFER: usize = 16 * 1024 * 1024;

fn validate_log(log: &LogConfig) -> Checked {
    if log.level.trim().is_empty() {
        return Err(Invalid::new(KeyPath::new("log.level"), "must not be empty"));
    }
    if log.access_buffer_bytes > MAX_ACCESS_BUFFER {
        return Err(Invalid::new(
            KeyPath::new("log.access_buffer_bytes"),
            format!(
                "must be at most {MAX_ACCESS_BUFFER} (16 MiB), got {}",
                log.access_buffer_bytes
            ),
        ));
    }
    nonzero(
        log.access_flush_interval,
        &KeyPath::new("log.access_flush_interval"),
    )
}

fn validate_route(route: &RouteConfig, at: KeyPath) -> Checked {
    let named = |reason: &str| format!("route \"{}\": {reason}", route.name);
    if route.name.trim().is_empty() {
        return Err(Invalid::new(at.key("name"), "must not be empty"));
    }
    if route.model.as_ref().is_some_and(|m| m.trim().is_empty()) {
        return Err(Invalid::new(
            at.key("model"),
            named("model names must not be empty"),
        ));
    }
    if route.model.is_none() && !route.fallbacks.is_empty() {
        return Err(Invalid::new(
            at.key("fallbacks"),
            named("needs `model` to be set as well"),
        ));
    }
    if route.first_byte_timeout.is_some_and(|t| t.is_zero()) {
        return Err(Invalid::new(
            at.key("first_byte_timeout"),
            named("must be longer than 0s"),
        ));
    }
    limits(route.max_concurrent, route.requests_per_minute, &at)?;
    super::redis::validate_budget(route.budget.as_ref(), &at)?;
    if let Some(path) = &route.matcher.path {
        if !path.starts_with("/v1") {
            return Err(Invalid::new(
                at.key("match").key("path"),
                named("must start with /v1"),
            ));
        }
    }
    for name in route.matcher.headers.keys() {
        header_name(name, at.clone().key("match").key("headers").key(name))?;
    }
    for (name, value) in &route.set_headers {
        header_pair(name, value, at.clone().key("set_headers").key(name))?;
    }
    for (i, name) in route.remove_headers.iter().enumerate() {
        header_name(name, at.clone().key("remove_headers").index(i))?;
    }
    Ok(())
}

/// Checks `[[server.tokens]]`, or a token file's `[[tokens]]` (under `at`).
pub fn validate_tokens(tokens: &[TokenConfig], at: KeyPath) -> Checked {
    let mut names = HashSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let at = at.clone().index(i);
        if token.name.trim().is_empty() {
            return Err(Invalid::new(at.key("name"), "must not be empty"));
        }
        if !names.insert(token.name.as_str()) {
            return Err(Invalid::new(
                at.key("name"),
                format!("duplicate token name \"{}\"", token.name),
            ));
        }
        let hex = token.sha256.len() == 64 && token.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex {
            return Err(Invalid::new(
                at.key("sha256"),
                "must be the 64 hex digits of the token's SHA-256 (see openrouter-proxy --hash-token)",
            ));
        }
        limits(token.max_concurrent, token.requests_per_minute, &at)?;
        super::redis::validate_budget(token.budget.as_ref(), &at)?;
    }
    Ok(())
}

fn limits(concurrent: Option<usize>, per_minute: Option<u32>, at: &KeyPath) -> Checked {
    if concurrent == Some(0) {
        return Err(Invalid::new(
            at.clone().key("max_concurrent"),
            "must be at least 1 (omit it for no limit)",
        ));
    }
    if per_minute == Some(0) {
        return Err(Invalid::new(
            at.clone().key("requests_per_minute"),
            "must be at least 1 (omit it for no limit)",
        ));
    }
    Ok(())
}

fn positive(value: u64, key: &str) -> Checked {
    if value == 0 {
        return Err(Invalid::new(KeyPath::new(key), "must be greater than 0"));
    }
    Ok(())
}

pub(super) fn nonzero(value: Duration, key: &KeyPath) -> Checked {
    if value.is_zero() {
        return Err(Invalid::new(key.clone(), "must be longer than 0s"));
    }
    Ok(())
}

fn header_name(name: &str, key: KeyPath) -> Checked {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| Invalid::new(key, "not a valid header name"))
}

pub(super) fn header_pair(name: &str, value: &str, key: KeyPath) -> Checked {
    header_name(name, key.clone())?;
    http::HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| Invalid::new(key, "the value is not a valid header value"))
}
