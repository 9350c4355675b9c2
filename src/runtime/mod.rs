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

use crate::config::Config;
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
        Ok(Runtime {
            config: Arc::new(config),
            router,
            upstreams,
            tokens,
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

    pub fn fallback_on_status(&self, status: u16) -> bool {
        self.config.fallback.on_status.contains(&status)
    }
}
