//! openrouter-proxy: an OpenAI-compatible reverse proxy in front of OpenRouter, built to run as a
//! Kubernetes sidecar. `serve` runs the whole proxy on listeners the caller has bound, so tests
//! boot the real server in-process on port 0.

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod router;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use server::Listeners;

/// Serves `config` on `listeners` until `shutdown` resolves, then drains gracefully and returns.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    crate::metrics::handle();
    crate::metrics::describe();
    let runtime = reload::Runtime::build(config, None)?;
    let shared = Arc::new(proxy::Shared::new(runtime));
    server::run(shared, listeners, shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))
}
