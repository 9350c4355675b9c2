//! The worker tier: OpenAI's Files and Batches API served by the proxy, batches run line by line
//! through the proxy's own pipeline (a [`LineExecutor`]) below live traffic, with backoff on
//! retryable failures, and every state durable in a [`BatchStore`].
//!
//! Wiring: at start-up, [`BatchService::open`] with the `[batch]` config, the executor and the
//! live in-flight counter; per request, when [`owns`] says the path is ours,
//! [`BatchService::handle`] with the caller's owner string; at shutdown,
//! [`BatchService::shutdown`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::BatchConfig;

mod api;
mod body;
pub mod executor;
mod input;
mod lifecycle;
pub mod metrics;
pub mod model;
mod outcome;
pub mod store;
mod worker;

pub use body::ApiBody;
pub use executor::{LineExecutor, LineFuture, LineOutcome, LineRequest, LineResponse};
pub use input::ENDPOINTS;
pub use model::{Clock, SystemClock};
pub use store::{BatchStore, RedisStore, SqliteStore, StoreError};

/// Whether `path` belongs to the Batch API (`/v1/files...`, `/v1/batches...`). With `[batch]`
/// configured the proxy answers these itself; without, they are forwarded upstream.
pub fn owns(path: &str) -> bool {
    let under = |root: &str| {
        path.strip_prefix(root)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    under("/v1/files") || under("/v1/batches")
}

/// What the API handlers, the workers and the lifecycle share.
struct Inner {
    config: BatchConfig,
    store: Arc<dyn BatchStore>,
    executor: Arc<dyn LineExecutor>,
    live: Arc<AtomicUsize>,
    clock: Arc<dyn Clock>,
    /// Wakes the dispatcher: a line settled, a batch started.
    work: Notify,
    /// Wakes the lifecycle: a batch was created or cancelled, a line settled for good.
    lifecycle: Notify,
    /// `Some(grace)` once the service is stopping: in-flight lines get `grace` to finish.
    stop: watch::Sender<Option<Duration>>,
}

impl Inner {
    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn now_secs(&self) -> u64 {
        model::unix_secs(self.now())
    }

    /// Live requests in flight above `yield_above`: batch work waits.
    fn busy(&self) -> bool {
        self.live.load(Ordering::Relaxed) > self.config.yield_above
    }
}

/// Resolves once the service is stopping.
async fn stopped(stop: &mut watch::Receiver<Option<Duration>>) {
    // An error means the sender is gone, which only happens once the service is.
    let _ = stop.wait_for(Option::is_some).await;
}

/// The running Batch API: its store, its line workers and the lifecycle task (validation,
/// finalization, expiry, retention, gauges).
pub struct BatchService {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl BatchService {
    /// Opens the embedded store in `config.store` and starts the workers. `live` is the proxy's
    /// count of live requests in flight (batch work pauses while it is above `yield_above`).
    /// Must be called within the Tokio runtime. Fails when the store cannot be opened (another
    /// process holds it, the directory is not writable).
    pub fn open(
        config: &BatchConfig,
        executor: Arc<dyn LineExecutor>,
        live: Arc<AtomicUsize>,
    ) -> Result<BatchService, StoreError> {
        let store = SqliteStore::open(&config.store)?;
        Ok(BatchService::start(
            config.clone(),
            Arc::new(store),
            executor,
            live,
            Arc::new(SystemClock),
        ))
    }

    /// Starts the service on any store and clock (tests; a shared store later). Must be called
    /// within the Tokio runtime.
    pub fn start(
        config: BatchConfig,
        store: Arc<dyn BatchStore>,
        executor: Arc<dyn LineExecutor>,
        live: Arc<AtomicUsize>,
        clock: Arc<dyn Clock>,
    ) -> BatchService {
        metrics::describe();
        let (stop, stopping) = watch::channel(None);
        let inner = Arc::new(Inner {
            config,
            store,
            executor,
            live,
            clock,
            work: Notify::new(),
            lifecycle: Notify::new(),
            stop,
        });
        let tasks = vec![
            tokio::spawn(worker::dispatch(inner.clone(), stopping.clone())),
            tokio::spawn(lifecycle::run(inner.clone(), stopping)),
        ];
        BatchService {
            inner,
            tasks: Mutex::new(tasks),
        }
    }

    /// Answers one request on a path that [`owns`] accepts, on behalf of `owner` (the inbound
    /// token's name, or a hash of a pass-through key): objects of other owners do not exist for
    /// it. Errors are OpenAI-shaped JSON. File contents are streamed, never buffered whole.
    pub async fn handle<B>(&self, owner: &str, request: Request<B>) -> Response<ApiBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        api::handle(&self.inner, owner, request).await
    }

    /// Stops taking lines, lets the lines in flight finish for up to `grace` (their results are
    /// kept), abandons the rest (they run again at the next start) and releases the store.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.inner.stop.send(Some(grace));
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for mut task in tasks {
            // The dispatcher waits `grace` for its lines itself; this bound only guards a hang.
            if tokio::time::timeout(grace + Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
        if let Err(error) = self.inner.store.close().await {
            tracing::warn!(%error, "closing the batch store failed");
        }
    }
}

impl Drop for BatchService {
    fn drop(&mut self) {
        // Dropped without `shutdown`: the tasks stop at once; lines in flight run again later.
        let _ = self.inner.stop.send(Some(Duration::ZERO));
    }
}

#[cfg(test)]
mod tests {
    use super::owns;

    #[test]
    fn owns_the_files_and_batches_paths_only() {
        for path in [
            "/v1/files",
            "/v1/files/file-1",
            "/v1/files/file-1/content",
            "/v1/batches",
            "/v1/batches/batch_1/cancel",
        ] {
            assert!(owns(path), "{path}");
        }
        for path in [
            "/v1/filesystem",
            "/v1/chat/completions",
            "/v1/batches2",
            "/files",
        ] {
            assert!(!owns(path), "{path}");
        }
    }
}
