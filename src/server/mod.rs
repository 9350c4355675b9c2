//! Accept loops for the API and admin listeners, their connection caps, and graceful shutdown
//! with a deadline.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub mod admin;
mod api;
mod connection;
mod version;
mod workers;

pub use workers::Workers;

use crate::batch::{BatchService, RedisStore};
use crate::config::ServerConfig;
use crate::pipeline::line::{CallerKeys, PipelineLines};
use crate::pipeline::Shared;
use crate::runtime::ReloadLog;
use crate::server::connection::{ConnPolicy, Pressure};

/// The two bound sockets the proxy serves on. Binding is the caller's job, so tests can use port 0.
pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

/// Runs both listeners until `shutdown` resolves, then drains: `/readyz` turns 503 at once, new
/// connections are refused after `drain_delay`, and in-flight requests (open streams included)
/// get up to `shutdown_grace` to finish.
///
/// With `[batch]` configured, the Batch API starts first (its store opened, its workers running
/// below the live traffic counted here) and stops within the same grace period as the
/// connections.
///
/// Connection caps and timeouts are fixed here at start-up; `drain_delay` and `shutdown_grace`
/// are read from the config running when the shutdown begins.
pub async fn run(
    shared: Arc<Shared>,
    reloads: Arc<ReloadLog>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let settings = shared.runtime.load().config.server.clone();
    // Dropped (and so stopped) when `run` ends.
    let mut background = JoinSet::new();
    background.spawn(heartbeat());
    let keys = Arc::new(CallerKeys::default());
    let live = Arc::new(AtomicUsize::new(0));
    let batch = start_batch(&shared, &keys, &live)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = spawn_admin(&shared, reloads, &settings, listeners.admin);
    let (drain_tx, drain_rx) = watch::channel(false);
    let api_policy = policy(&settings, drain_rx);
    let api_pressure = api_policy.pressure.clone();
    let api = {
        let api = Arc::new(api::Api {
            shared: shared.clone(),
            batch: batch.clone(),
            keys,
            live,
        });
        let handle = move |request| api::handle(api.clone(), request);
        let listener = Accept {
            name: "api",
            spread: true,
            max_connections: settings.max_connections,
            policy: api_policy,
            builder: builder(&settings),
        };
        tokio::spawn(listener.run(listeners.api, stop_rx, handle))
    };

    shutdown.await;
    shared.draining.store(true, Ordering::SeqCst);
    let settings = shared.runtime.load().config.server.clone();
    tracing::info!(
        drain_delay = ?settings.drain_delay,
        grace = ?settings.shutdown_grace,
        "shutting down: readiness is now 503"
    );
    tokio::time::sleep(settings.drain_delay).await;
    let _ = stop_tx.send(true);

    let connections = match api.await {
        Ok(connections) => connections,
        Err(error) => {
            tracing::error!(%error, "the accept loop failed");
            admin.abort();
            return Err(std::io::Error::other(error));
        }
    };
    let _ = drain_tx.send(true);
    // Connections busy now close after their last answer: raised pressure wakes each one as its
    // last request ends (the accept loop, which lowers it, has stopped).
    api_pressure.raise();
    drain(connections, batch.as_deref(), settings.shutdown_grace).await;
    admin.abort();
    Ok(())
}

/// The admin listener's accept loop. The admin port keeps answering while the API drains, so
/// probes see the 503 readiness; its connections end when the returned task is aborted (when
/// `run` ends).
fn spawn_admin(
    shared: &Arc<Shared>,
    reloads: Arc<ReloadLog>,
    settings: &ServerConfig,
    listener: TcpListener,
) -> tokio::task::JoinHandle<()> {
    let shared = shared.clone();
    let handle =
        move |request| crate::server::admin::handle(shared.clone(), reloads.clone(), request);
    // Never stopped nor drained: the task is aborted when `run` ends, and its connections with it.
    let (keep, never) = watch::channel(false);
    let accept = Accept {
        name: "admin",
        spread: false,
        max_connections: settings.admin_max_connections,
        policy: policy(settings, never.clone()),
        builder: builder(settings),
    };
    tokio::spawn(async move {
        let _keep = keep;
        let _connections = accept.run(listener, never, handle).await;
    })
}

/// How often the runtime's time driver is woken by a timer of its own, at most.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`HEARTBEAT`]. Tokio wakes its time driver (an eventfd write, then
/// one more turn of the event loop) whenever a timer is set to fire before the driver's planned
/// wake-up; with no timer near, every request's header-read and first-byte timers (seconds
/// long) would each do that. A tick a second costs nothing by comparison.
async fn heartbeat() {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Lets the open connections and the batch lines in flight finish within `grace`, side by side;
/// then closes what is left (unfinished lines run again at the next start).
async fn drain(mut connections: JoinSet<()>, batch: Option<&BatchService>, grace: Duration) {
    let open = connections.len();
    let (finished, ()) = tokio::join!(
        tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        }),
        async {
            if let Some(batch) = batch {
                batch.shutdown(grace).await;
            }
        }
    );
    // Dropping the set aborts what is still running.
    drop(connections);
    if finished.is_err() {
        tracing::warn!(
            open,
            "shutdown grace period over: closing the remaining connections"
        );
    } else {
        tracing::info!("all connections finished");
    }
}

/// Opens the Batch API when `[batch]` is configured; its lines run through the pipeline.
fn start_batch(
    shared: &Arc<Shared>,
    keys: &Arc<CallerKeys>,
    live: &Arc<AtomicUsize>,
) -> std::io::Result<Option<Arc<BatchService>>> {
    let runtime = shared.runtime.load();
    let Some(config) = &runtime.config.batch else {
        return Ok(None);
    };
    let lines = Arc::new(PipelineLines::new(shared.clone(), keys.clone()));
    let service = match &runtime.redis {
        // Shared by every replica: batches, files and lines in Redis (which may be down now:
        // the API answers 503 and the workers wait until it is back).
        Some(redis) => {
            let store = RedisStore::new(redis.clone(), config.claim_after);
            tracing::info!(
                store = "redis",
                key_prefix = %redis.settings().key_prefix,
                consumer = store.consumer(),
                concurrency = config.concurrency,
                "batch API enabled; batches are shared with every replica on the same redis"
            );
            let clock = Arc::new(crate::batch::SystemClock);
            BatchService::start(config.clone(), Arc::new(store), lines, live.clone(), clock)
        }
        None => {
            let service = BatchService::open(config, lines, live.clone()).map_err(|error| {
                std::io::Error::other(format!(
                    "cannot open the batch store in {}: {error}",
                    config.store.display()
                ))
            })?;
            tracing::info!(store = "sqlite", path = %config.store.display(), concurrency = config.concurrency, "batch API enabled");
            service
        }
    };
    Ok(Some(Arc::new(service)))
}

fn policy(settings: &ServerConfig, drain: watch::Receiver<bool>) -> ConnPolicy {
    ConnPolicy {
        head_timeout: settings.header_read_timeout,
        pressure: Arc::new(Pressure::default()),
        drain,
    }
}

fn builder(settings: &ServerConfig) -> version::Builders {
    version::Builders::new(
        settings.header_read_timeout,
        settings.max_header_bytes,
        settings.max_headers,
        settings.http2_max_concurrent_streams,
    )
}

/// One listener's accept loop.
struct Accept {
    name: &'static str,
    /// Whether connections are spread over the serving runtimes (else served on this one).
    spread: bool,
    max_connections: usize,
    policy: ConnPolicy,
    builder: version::Builders,
}

impl Accept {
    /// Accepts until `stop` changes (or its sender is dropped) and returns the open connections.
    /// At the cap, idle connections are asked to close; surplus connections wait in the kernel's
    /// accept queue rather than being accepted and failed.
    async fn run<H, F, B>(
        self,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
        handle: H,
    ) -> JoinSet<()>
    where
        H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut connections = JoinSet::new();
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let pressure = self.policy.pressure.clone();
        loop {
            let permit = match limit.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    tracing::debug!(
                        listener = self.name,
                        "connection cap reached: closing idle connections"
                    );
                    pressure.raise();
                    let permit = tokio::select! {
                        permit = limit.clone().acquire_owned() => permit,
                        _ = stop.changed() => break,
                    };
                    pressure.lower();
                    match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    }
                }
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(listener = self.name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            while connections.try_join_next().is_some() {}
            let (builder, policy, handle) =
                (self.builder.clone(), self.policy.clone(), handle.clone());
            let serve = move |stream| {
                let served = crate::server::connection::serve(stream, builder, policy, handle);
                async move {
                    served.await;
                    drop(permit);
                }
            };
            match self.spread.then(crate::serving::place).flatten() {
                Some((runtime, placed)) => {
                    spawn_on(&mut connections, &runtime, placed, stream, serve)
                }
                None => {
                    connections.spawn(serve(stream));
                }
            }
        }
        pressure.lower();
        connections
    }
}

/// Serves `stream` on the serving runtime it was placed on, counted there (`placed`) while it is
/// open. On another runtime, the socket leaves this runtime's event loop and joins that one's.
fn spawn_on<S, F>(
    connections: &mut JoinSet<()>,
    runtime: &tokio::runtime::Handle,
    placed: crate::serving::Placed,
    stream: TcpStream,
    serve: S,
) where
    S: FnOnce(TcpStream) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    if placed.is_here() {
        connections.spawn(async move {
            let _placed = placed;
            serve(stream).await;
        });
        return;
    }
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot hand a connection to another thread");
            return;
        }
    };
    connections.spawn_on(
        async move {
            let _placed = placed;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!(%error, "cannot serve a handed-over connection"),
            }
        },
        runtime,
    );
}
