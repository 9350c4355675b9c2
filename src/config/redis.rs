//! The `[redis]` table, `[cache] tier2` and the spend `budget` of tokens and routes: schema,
//! defaults and checks. Errors name the key, never a URL or a password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::{Invalid, KeyPath};

type Checked = Result<(), Invalid>;

/// `[redis]`: state shared by every replica (cache tier 2, rate limits, budgets). Absent, all of
/// it stays in-process.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Environment variable holding the URL.
    pub url_env: Option<String>,
    /// The URL itself: `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: Option<String>,
    /// File holding the URL (a mounted Secret), read at start and on every reload.
    pub url_file: Option<PathBuf>,
    /// Prepended to every key the proxy writes, to share one Redis with other programs.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// A Redis call slower than this counts as Redis being unavailable; it bounds the latency
    /// Redis can add to a request.
    #[serde(default = "default_op_timeout", with = "super::humantime_serde")]
    pub op_timeout: Duration,
    /// Multiplexed connections, each with its own reconnecting manager. Every one pipelines any
    /// number of concurrent calls; with more than one, the first carries the cache tier's writes
    /// and the others take the calls made for requests in turn, so that a large answer being
    /// written never delays a rate-limit call queued behind it on the same socket.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

/// Where the Redis URL comes from (exactly one of `url_env`, `url`, `url_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisUrlSource<'a> {
    Env(&'a str),
    Inline(&'a str),
    File(&'a Path),
}

impl RedisConfig {
    /// The configured source of the URL; `None` only for a config that failed validation.
    pub fn url_source(&self) -> Option<RedisUrlSource<'_>> {
        match (&self.url_env, &self.url, &self.url_file) {
            (Some(name), None, None) => Some(RedisUrlSource::Env(name)),
            (None, Some(url), None) => Some(RedisUrlSource::Inline(url)),
            (None, None, Some(path)) => Some(RedisUrlSource::File(path)),
            _ => None,
        }
    }
}

impl fmt::Debug for RedisConfig {
    /// The URL may carry a password: only whether it is set is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url_env", &self.url_env)
            .field("url", &self.url.as_ref().map(|_| "(set)"))
            .field("url_file", &self.url_file)
            .field("key_prefix", &self.key_prefix)
            .field("op_timeout", &self.op_timeout)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

fn default_key_prefix() -> String {
    "orp:".to_owned()
}

fn default_op_timeout() -> Duration {
    Duration::from_millis(50)
}

fn default_pool_size() -> usize {
    8
}

/// `[cache] tier2`: the store behind the in-memory cache.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheTier2 {
    /// The `[redis]` server, shared by every replica.
    Redis,
}

/// `budget = { usd_per_day = 50.0, usd_per_month = 1000.0 }` on a token or a route: spend from
/// the answers' `usage.cost`, per UTC day and UTC month.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub usd_per_day: Option<f64>,
    pub usd_per_month: Option<f64>,
}

/// The longest `op_timeout` accepted: a Redis call is meant to add a round trip, not seconds.
const MAX_OP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_POOL_SIZE: usize = 64;
const MAX_KEY_PREFIX: usize = 64;

/// Checks `[redis]` and `[cache] tier2` together (tier 2 needs a Redis).
pub fn validate_redis(redis: Option<&RedisConfig>, tier2: Option<CacheTier2>) -> Checked {
    let Some(redis) = redis else {
        return match tier2 {
            Some(_) => Err(Invalid::new(
                KeyPath::new("cache.tier2"),
                "needs a [redis] table to store answers in",
            )),
            None => Ok(()),
        };
    };
    let at = |key: &str| KeyPath::new("redis").key(key);
    let sources = [
        redis.url_env.is_some(),
        redis.url.is_some(),
        redis.url_file.is_some(),
    ];
    if sources.iter().filter(|set| **set).count() != 1 {
        return Err(Invalid::new(
            KeyPath::new("redis"),
            "set exactly one of url_env, url and url_file",
        ));
    }
    match redis.url_source() {
        Some(RedisUrlSource::Env(name)) if name.trim().is_empty() => {
            return Err(Invalid::new(at("url_env"), "must not be empty"));
        }
        Some(RedisUrlSource::File(path)) if path.as_os_str().is_empty() => {
            return Err(Invalid::new(at("url_file"), "must not be empty"));
        }
        Some(RedisUrlSource::Inline(url)) => {
            check_url(url).map_err(|r| Invalid::new(at("url"), r))?
        }
        _ => {}
    }
    let prefix = &redis.key_prefix;
    if prefix.is_empty()
        || prefix.len() > MAX_KEY_PREFIX
        || !prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Invalid::new(
            at("key_prefix"),
            format!("must be 1 to {MAX_KEY_PREFIX} printable ASCII characters without spaces"),
        ));
    }
    if redis.op_timeout.is_zero() || redis.op_timeout > MAX_OP_TIMEOUT {
        return Err(Invalid::new(
            at("op_timeout"),
            "must be longer than 0s and at most 5s",
        ));
    }
    if redis.pool_size == 0 || redis.pool_size > MAX_POOL_SIZE {
        return Err(Invalid::new(
            at("pool_size"),
            format!("must be from 1 to {MAX_POOL_SIZE}, got {}", redis.pool_size),
        ));
    }
    Ok(())
}

/// Checks a Redis URL's shape; the reason never quotes it (it may hold a password). Used on the
/// inline `url` here and on the URL read from `url_env` or `url_file` when connecting.
pub fn check_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    if !scheme_ok || ::redis::Client::open(url).is_err() {
        return Err("must be a valid redis:// or rediss:// URL".to_owned());
    }
    Ok(())
}

/// Checks the `budget` of a token or route at `at`.
pub fn validate_budget(budget: Option<&BudgetConfig>, at: &KeyPath) -> Checked {
    let Some(budget) = budget else {
        return Ok(());
    };
    let at = at.clone().key("budget");
    if budget.usd_per_day.is_none() && budget.usd_per_month.is_none() {
        return Err(Invalid::new(
            at,
            "set usd_per_day, usd_per_month or both (omit budget for no limit)",
        ));
    }
    for (key, value) in [
        ("usd_per_day", budget.usd_per_day),
        ("usd_per_month", budget.usd_per_month),
    ] {
        if value.is_some_and(|usd| !usd.is_finite() || usd <= 0.0) {
            return Err(Invalid::new(
                at.clone().key(key),
                "must be a positive number of US dollars",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_being_quoted() {
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("rediss://user:secret@redis.example:6380").is_ok());
        let reason = check_url("http://user:secret@redis").unwrap_err();
        assert!(!reason.contains("secret"), "{reason}");
        assert!(check_url("redis://").is_err());
    }
}
