//! Accept loops for the API and admin listeners, the connection limit, and graceful shutdown with
//! a deadline.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::ServerConfig;
use crate::proxy::Shared;
use crate::reload::ReloadLog;

/// The two bound sockets the proxy serves on. Binding is the caller's job, so tests can use port 0.
pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

/// Runs both listeners until `shutdown` resolves, then drains: `/readyz` turns 503 at once, new
/// connections are refused after `drain_delay`, and in-flight requests (open streams included)
/// get up to `shutdown_grace` to finish.
///
/// `max_connections` and `header_read_timeout` are fixed here at start-up; `drain_delay` and
/// `shutdown_grace` are read from the config running when the shutdown begins.
pub async fn run(
    shared: Arc<Shared>,
    reloads: Arc<ReloadLog>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let settings = shared.runtime.load().config.server.clone();
    let (stop_tx, stop_rx) = watch::channel(false);

    // Both loops also end when `stop_tx` is dropped, so dropping this future leaks no task.
    let admin = tokio::spawn(accept_admin(
        listeners.admin,
        shared.clone(),
        reloads,
        stop_rx.clone(),
    ));
    let api = tokio::spawn(accept_api(
        listeners.api,
        shared.clone(),
        settings.clone(),
        stop_rx,
    ));

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

    let Draining {
        graceful,
        connections,
    } = match api.await {
        Ok(draining) => draining,
        Err(error) => {
            tracing::error!(%error, "the accept loop failed");
            admin.abort();
            return Err(std::io::Error::other(error));
        }
    };
    let open = graceful.count();
    let finished = tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await;
    drop(connections);
    if finished.is_err() {
        tracing::warn!(
            open,
            "shutdown grace period over: closing the remaining connections"
        );
    } else {
        tracing::info!("all connections finished");
    }
    admin.abort();
    Ok(())
}

async fn accept_api(
    listener: TcpListener,
    shared: Arc<Shared>,
    settings: ServerConfig,
    mut stop: watch::Receiver<bool>,
) -> Draining {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also closes keep-alive connections that stay idle this long before their next request.
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .max_headers(settings.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find dead peers of long streams; an unanswered ping closes the connection.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));

    loop {
        // Waiting for a free slot first leaves surplus connections in the kernel's accept queue
        // instead of accepting them and failing them.
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = service_fn(move |request| crate::proxy::handle(shared.clone(), request));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "client connection ended with an error");
            }
            drop(permit);
        });
    }
    Draining {
        graceful,
        connections,
    }
}

/// The API's open connections once accepting has stopped.
struct Draining {
    graceful: GracefulShutdown,
    /// Dropping the set (at the grace deadline, or when `run` itself is dropped) aborts what is
    /// still running.
    connections: JoinSet<()>,
}

async fn accept_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    reloads: Arc<ReloadLog>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        // The admin port keeps answering while the API drains, so probes see the 503 readiness;
        // it ends only with `run` itself (the stop sender dropped).
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Err(_) = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let reloads = reloads.clone();
        let service = service_fn(move |request| {
            crate::admin::handle(shared.clone(), reloads.clone(), request)
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}
