//! Checks of the upstream sections (`[upstream]` and `[upstreams.<name>]`: URL or endpoints, key
//! or key pool, timeouts, headers) and of what routes say about them (the upstream of each
//! attempt, the body policy).

use std::collections::HashSet;

use super::error::{Invalid, KeyPath};
use super::validate::{header_pair, nonzero, Checked};
use super::{Config, RouteConfig, UpstreamAuth, UpstreamConfig, DEFAULT_UPSTREAM};

/// The `base_url` an upstream has when its section names none.
pub const DEFAULT_BASE_URL: &str = "https://openrouter.ai/api/v1";

impl Config {
    /// Every upstream by name: `[upstream]` as "default", then `[upstreams.*]` in name order.
    pub fn all_upstreams(&self) -> impl Iterator<Item = (&str, &UpstreamConfig)> {
        std::iter::once((DEFAULT_UPSTREAM, &self.upstream))
            .chain(self.upstreams.iter().map(|(n, u)| (n.as_str(), u)))
    }

    pub(super) fn validate_upstreams(&self) -> Checked {
        validate_upstream(&self.upstream, &KeyPath::new("upstream"))?;
        for (name, upstream) in &self.upstreams {
            let at = KeyPath::new("upstreams").key(name);
            let label_safe = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !label_safe {
                return Err(Invalid::new(
                    at,
                    "an upstream name is letters, digits, '-', '_' and '.' only",
                ));
            }
            if name == DEFAULT_UPSTREAM {
                return Err(Invalid::new(
                    at,
                    "\"default\" is the name of [upstream]; choose another",
                ));
            }
            validate_upstream(upstream, &at)?;
        }
        Ok(())
    }

    /// Every file a key is read from, in every upstream.
    pub fn key_files(&self) -> Vec<&std::path::Path> {
        self.all_upstreams()
            .flat_map(|(_, u)| {
                let pool = u.keys.iter().filter_map(|k| k.file.as_deref());
                u.api_key_file.as_deref().into_iter().chain(pool)
            })
            .collect()
    }

    /// Whether `name` is an upstream of this config.
    pub fn has_upstream(&self, name: &str) -> bool {
        name == DEFAULT_UPSTREAM || self.upstreams.contains_key(name)
    }
}

fn validate_upstream(u: &UpstreamConfig, at: &KeyPath) -> Checked {
    let key = |k: &str| at.clone().key(k);
    if !u.endpoints.is_empty() && u.base_url != DEFAULT_BASE_URL {
        return Err(Invalid::new(
            key("endpoints"),
            "set either base_url or endpoints, not both",
        ));
    }
    if u.endpoints.is_empty() {
        super::BaseUrl::parse(&u.base_url)
            .map_err(|reason| Invalid::new(key("base_url"), reason))?;
    }
    for (i, endpoint) in u.endpoints.iter().enumerate() {
        super::BaseUrl::parse(endpoint)
            .map_err(|reason| Invalid::new(key("endpoints").index(i), reason))?;
    }
    validate_keys(u, at)?;
    nonzero(u.connect_timeout, &key("connect_timeout"))?;
    nonzero(u.first_byte_timeout, &key("first_byte_timeout"))?;
    nonzero(u.stream_idle_timeout, &key("stream_idle_timeout"))?;
    for (name, value) in &u.headers {
        header_pair(name, value, key("headers").key(name))?;
    }
    Ok(())
}

fn validate_keys(u: &UpstreamConfig, at: &KeyPath) -> Checked {
    let key = |k: &str| at.clone().key(k);
    if u.api_key_env.is_some() && u.api_key_file.is_some() {
        return Err(Invalid::new(
            key("api_key_file"),
            "set either api_key_env or api_key_file, not both",
        ));
    }
    if u.api_key_env.as_deref() == Some("") {
        return Err(Invalid::new(key("api_key_env"), "must not be empty"));
    }
    let single = u.api_key_env.is_some() || u.api_key_file.is_some();
    if !u.keys.is_empty() && single {
        return Err(Invalid::new(
            key("keys"),
            "set either keys or api_key_env / api_key_file, not both",
        ));
    }
    if u.auth != UpstreamAuth::Inject && !u.keys.is_empty() {
        return Err(Invalid::new(
            key("auth"),
            "keys are only used with auth = \"inject\"",
        ));
    }
    let mut names = HashSet::new();
    for (i, entry) in u.keys.iter().enumerate() {
        let at = key("keys").index(i);
        match (&entry.env, &entry.file) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(at, "a key has either env or file, not both"));
            }
            (None, None) => {
                return Err(Invalid::new(at, "a key needs env (a variable) or file"));
            }
            (Some(env), None) if env.is_empty() => {
                return Err(Invalid::new(at.key("env"), "must not be empty"));
            }
            _ => {}
        }
        if entry.weight == 0 {
            return Err(Invalid::new(at.key("weight"), "must be at least 1"));
        }
        let name = entry.name.clone().unwrap_or_else(|| i.to_string());
        if !names.insert(name.clone()) {
            return Err(Invalid::new(
                at.key("name"),
                format!("duplicate key name \"{name}\""),
            ));
        }
    }
    Ok(())
}

/// The upstreams a route's attempts name, and its body policy.
pub(super) fn validate_route_targets(
    config: &Config,
    route: &RouteConfig,
    at: &KeyPath,
) -> Checked {
    let named = |reason: String| format!("route \"{}\": {reason}", route.name);
    if let Some(upstream) = route.upstream.as_deref() {
        if !config.has_upstream(upstream) {
            return Err(Invalid::new(
                at.clone().key("upstream"),
                named(format!("no upstream is named \"{upstream}\"")),
            ));
        }
    }
    for (i, fallback) in route.fallbacks.iter().enumerate() {
        let at = at.clone().key("fallbacks").index(i);
        if fallback.model().trim().is_empty() {
            return Err(Invalid::new(
                at,
                named("model names must not be empty".into()),
            ));
        }
        if let Some(upstream) = fallback.upstream().filter(|u| !config.has_upstream(u)) {
            return Err(Invalid::new(
                at.key("upstream"),
                named(format!("no upstream is named \"{upstream}\"")),
            ));
        }
    }
    for (key, value) in [
        ("set_body", &route.set_body),
        ("default_body", &route.default_body),
    ] {
        if value.as_ref().is_some_and(|v| !v.is_table()) {
            return Err(Invalid::new(
                at.clone().key(key),
                named("must be a table (a JSON object merged into the body)".into()),
            ));
        }
    }
    for (i, field) in route.unset_body.iter().enumerate() {
        if field.is_empty() || field == "model" {
            return Err(Invalid::new(
                at.clone().key("unset_body").index(i),
                named("the field name must not be empty or \"model\"".into()),
            ));
        }
    }
    Ok(())
}
