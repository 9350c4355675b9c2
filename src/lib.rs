//! openrouter-proxy: an OpenAI-compatible reverse proxy in front of OpenRouter, built to run as a
//! Kubernetes sidecar. `serve` (a fixed config) and `serve_live` / `serve_file` (a config file,
//! reloaded live) run the whole proxy on listeners the caller has bound, so tests boot the real
//! server in-process on port 0.

pub mod auth;
pub mod batch;
pub mod cache;
pub mod config;
pub mod error;
pub mod explain;
pub mod health;
pub mod limits;
pub mod pattern;
pub mod pipeline;
pub mod record;
pub mod redis;
pub mod runtime;
pub mod server;
pub mod serving;
pub mod shape;
pub mod sse;
pub mod telemetry;
pub mod upstream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use config::Config;
pub use runtime::{LiveConfig, ReloadTrigger};
pub use server::Listeners;

/// Serves `config` on `listeners` until `shutdown` resolves, then drains gracefully and returns.
/// The config is fixed: nothing is watched or reloaded.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    init_metrics();
    let runtime = runtime::Runtime::build(config, None)?;
    let shared = Arc::new(pipeline::Shared::new(runtime)?);
    let telemetry = shared.telemetry.clone();
    let served = server::run(shared, Arc::default(), listeners, shutdown).await;
    flush_traces(&telemetry).await;
    served.map_err(|e| format!("server failed: {e}"))
}

/// Loads the config file at `path` and serves it like [`serve_live`].
pub async fn serve_file(
    path: PathBuf,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let live = LiveConfig::load(path).map_err(|e| format!("invalid config: {e}"))?;
    serve_live(live, listeners, shutdown).await
}

/// Serves `live` on `listeners` until `shutdown` resolves, reloading it when its file or its key
/// file changes (unless watching was turned off) and when its [`ReloadTrigger`] fires. Each
/// reload is validated and swapped in whole; a bad one leaves the running config serving. The
/// watcher stops when this returns (or is dropped).
pub async fn serve_live(
    live: LiveConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    init_metrics();
    let log = Arc::new(runtime::ReloadLog::default());
    let (runtime, reloader) = runtime::reload::start(live, log.clone())?;
    let shared = Arc::new(pipeline::Shared::new(runtime)?);
    // Dropping `stop` (also when this future is dropped mid-way) ends the reloader.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reloading = tokio::spawn(reloader.run(shared.runtime.clone(), stopped));
    let telemetry = shared.telemetry.clone();
    let served = server::run(shared, log, listeners, shutdown).await;
    flush_traces(&telemetry).await;
    let _ = stop.send(true);
    if let Err(error) = reloading.await {
        tracing::warn!(%error, "the config watcher ended abnormally");
    }
    served.map_err(|e| format!("server failed: {e}"))
}

/// Exports the spans of the drained requests before the process exits, bounded by the export
/// timeout (spans the collector did not take by then are counted as dropped).
async fn flush_traces(telemetry: &telemetry::Telemetry) {
    let Some(deadline) = telemetry.export_timeout() else {
        return;
    };
    if let Err(error) = telemetry.shutdown(deadline).await {
        tracing::warn!(%error, "trace export did not finish at shutdown");
    }
}

fn init_metrics() {
    crate::record::metrics::handle();
    crate::record::metrics::describe();
    crate::redis::describe_metrics();
    // Both series exist from the start, so dashboards and `increase()` see the first reload.
    ::metrics::counter!(crate::record::metrics::RELOADS, "result" => "ok").increment(0);
    ::metrics::counter!(crate::record::metrics::RELOADS, "result" => "error").increment(0);
}
