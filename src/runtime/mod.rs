//! The runtime: one immutable snapshot per loaded config (compiled routes, the upstream, the key,
//! inbound tokens), built off the request path and swapped in whole, and the reloader that
//! builds and swaps it. Nothing here knows the request pipeline; the pipeline reads a snapshot.

mod live;
pub mod policy;
pub mod pool;
pub mod reload;
pub mod router;
pub mod upstreams;

use std::sync::Arc;

use crate::cache::{Store, Tiers};
use crate::config::{CacheTier2, Config};
use crate::redis::{Redis, Tier2};
use router::{Plan, RequestFacts, Router};
use upstreams::Upstreams;

pub use live::{content_hash, ConfigOrigin, LiveConfig, ReloadLog, ReloadTrigger};

/// Everything a request needs from the config, compiled once per load.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    /// Every upstream routes may send attempts to; `[upstream]` is the default.
    pub upstreams: Upstreams,
    /// Inbound tokens; empty when the proxy is open.
    pub tokens: crate::auth::Tokens,
    /// The Redis shared by every replica, with `[redis]`.
    pub redis: Option<Redis>,
    /// The cache tiers behind memory (Redis, with `cache.tier2 = "redis"`).
    pub cache_tiers: Tiers,
    /// Which file and version this runtime was built from.
    pub origin: ConfigOrigin,
}

impl Runtime {
    /// Compiles `config`. `previous` is the runtime being replaced, whose upstream clients are
    /// reused where their connection settings are unchanged.
    pub fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, String> {
        let upstreams = Upstreams::build(&config, previous.map(|p| &p.upstreams))?;
        let router = Router::compile(&config, &upstreams);
        let tokens = crate::auth::Tokens::compile(&config)?;
        let redis = shared_redis(&config, previous.and_then(|p| p.redis.as_ref()))?;
        let cache_tiers: Tiers = match (&redis, config.cache.tier2) {
            (Some(redis), Some(CacheTier2::Redis)) => {
                let tier: Arc<dyn Store> = Arc::new(Tier2::new(redis.clone()));
                Arc::from(vec![tier])
            }
            _ => Arc::from(Vec::new()),
        };
        Ok(Runtime {
            config: Arc::new(config),
            router,
            upstreams,
            tokens,
            redis,
            cache_tiers,
            origin: ConfigOrigin::in_memory(),
        })
    }

    /// The plan for a request: the first matching route and its attempts.
    pub fn plan(&self, facts: &RequestFacts<'_>) -> Plan<'_> {
        let route = self.router.route(facts);
        Plan {
            route,
            attempts: route.attempts(),
        }
    }

    /// The upstreams and routes of `config` alone: what `explain` needs, with no Redis, no
    /// tokens and no task started.
    pub fn plan_only(config: Config) -> Result<Runtime, String> {
        let upstreams = Upstreams::build(&config, None)?;
        let router = Router::compile(&config, &upstreams);
        Ok(Runtime {
            config: Arc::new(config),
            router,
            upstreams,
            tokens: crate::auth::Tokens::default(),
            redis: None,
            cache_tiers: Arc::from(Vec::new()),
            origin: ConfigOrigin::in_memory(),
        })
    }

    pub fn fallback_on_status(&self, status: u16) -> bool {
        self.config.fallback.on_status.contains(&status)
    }
}

/// The Redis handle of `[redis]`: the running one when its settings did not change (a rotated
/// `url_file` is read again on every reload), else a new one. Connecting never waits: a Redis that
/// is down now is found when it comes back.
fn shared_redis(config: &Config, running: Option<&Redis>) -> Result<Option<Redis>, String> {
    Redis::follow_config(config.redis.as_ref(), running).map_err(|e| format!("redis: {e}"))
}
