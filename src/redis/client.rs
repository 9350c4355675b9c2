//! The connection to Redis: a few reconnecting multiplexed connections, every call bounded by
//! `op_timeout`, and the up/down state that lets the proxy serve without Redis and find it again.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, RedisResult};
use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::config::{check_url, RedisConfig, RedisUrlSource};

/// Bound on one connection attempt (TCP, TLS, AUTH); it runs in the background, never on a
/// request, so it may be longer than `op_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a health probe's PING.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes while Redis is down start this far apart and back off to `PROBE_MAX`, which keeps
/// recovery well within ten seconds of Redis coming back.
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(2);
/// A connection whose probes time out this many times in a row is replaced: the manager only
/// reconnects on errors, and a peer that vanished without a reset never sends one.
const STUCK_PROBES: u32 = 3;

/// Handles in this process that are not up: `openrouter_redis_up` is 1 only when none is (a
/// reload may briefly hold an old handle next to the new one).
static NOT_UP: Mutex<usize> = Mutex::new(0);

/// Moves one handle into or out of the not-up count and publishes the gauge, under one lock so
/// that the last change wins.
fn publish_up(change: isize) {
    let mut not_up = NOT_UP.lock().unwrap_or_else(PoisonError::into_inner);
    *not_up = not_up.saturating_add_signed(change);
    let up = if *not_up == 0 { 1.0 } else { 0.0 };
    metrics::gauge!(super::REDIS_UP).set(up);
}

/// The rate a cache write is allowed beyond `op_timeout`: 4 MiB may take 400 ms.
const WRITE_BYTES_PER_SEC: f64 = 10.0 * 1024.0 * 1024.0;

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What a [`Redis`] is built from: `[redis]` with its URL read from the environment or the file.
/// Compare two (on reload) to know whether the connection must be rebuilt.
#[derive(Clone, PartialEq)]
pub struct RedisSettings {
    url: String,
    pub key_prefix: String,
    pub op_timeout: Duration,
    pub pool_size: usize,
}

impl RedisSettings {
    /// Reads the URL from its source (call at start and on every reload, so that a rotated
    /// `url_file` is picked up). Errors name the source, never the URL.
    pub fn resolve(config: &RedisConfig) -> Result<RedisSettings, String> {
        let url = match config.url_source() {
            Some(RedisUrlSource::Inline(url)) => url.to_owned(),
            Some(RedisUrlSource::Env(name)) => std::env::var(name)
                .map_err(|_| format!("redis.url_env: environment variable {name} is not set"))?,
            Some(RedisUrlSource::File(path)) => std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "redis.url_file: cannot read {}: {}",
                    path.display(),
                    e.kind()
                )
            })?,
            None => return Err("redis: set exactly one of url_env, url and url_file".to_owned()),
        };
        let url = url.trim().to_owned();
        check_url(&url).map_err(|reason| format!("redis: the URL {reason}"))?;
        Ok(RedisSettings {
            url,
            key_prefix: config.key_prefix.clone(),
            op_timeout: config.op_timeout,
            pool_size: config.pool_size.max(1),
        })
    }
}

impl fmt::Debug for RedisSettings {
    /// The URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("key_prefix", &self.key_prefix)
            .field("op_timeout", &self.op_timeout)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// A handle on Redis, cheap to clone. Calls for requests go round-robin over `pool_size`
/// connections (all but the first, which carries cache writes, when there are several); while
/// Redis is down they return `None` at once, and a background probe brings it back.
#[derive(Clone)]
pub struct Redis(Arc<Inner>);

struct Inner {
    settings: RedisSettings,
    client: ::redis::Client,
    slots: Vec<Slot>,
    next: AtomicUsize,
    state: AtomicU8,
    /// Wakes the probe when a call finds Redis unavailable (and when this handle goes away).
    wake: Arc<Notify>,
}

struct Slot {
    manager: ArcSwap<ConnectionManager>,
    timeouts: AtomicU32,
}

impl Redis {
    /// Builds the connections without waiting for them (Redis may be down at start-up: the
    /// proxy serves anyway) and starts the probe that connects them. Needs a tokio runtime.
    pub fn connect(settings: RedisSettings) -> Result<Redis, String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("redis: must be started inside the tokio runtime".to_owned());
        }
        let client = ::redis::Client::open(settings.url.as_str())
            .map_err(|_| "redis: the URL must be a valid redis:// or rediss:// URL".to_owned())?;
        let slots = (0..settings.pool_size)
            .map(|_| {
                Ok(Slot {
                    manager: ArcSwap::from_pointee(manager(&client)?),
                    timeouts: AtomicU32::new(0),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let wake = Arc::new(Notify::new());
        super::start_counters();
        let inner = Arc::new(Inner {
            settings,
            client,
            slots,
            next: AtomicUsize::new(0),
            state: AtomicU8::new(UNKNOWN),
            wake: wake.clone(),
        });
        publish_up(1);
        tokio::spawn(watch(Arc::downgrade(&inner), wake));
        Ok(Redis(inner))
    }

    /// The handle a config calls for, given the `running` one (on a reload): `None` without
    /// `[redis]`; the running handle when its settings (the URL as read now included) did not
    /// change; else a new one. `[redis]` applies on reload, never needing a restart, and each
    /// change is logged as such; the old connections close once the requests using them end.
    pub fn follow_config(
        config: Option<&RedisConfig>,
        running: Option<&Redis>,
    ) -> Result<Option<Redis>, String> {
        let Some(config) = config else {
            if running.is_some() {
                tracing::info!(
                    "redis removed from the config (applied without restart); serving without it: per-replica limits and budgets, no cache tier 2"
                );
            }
            return Ok(None);
        };
        let settings = RedisSettings::resolve(config)?;
        let (key_prefix, op_timeout, pool_size) = (
            settings.key_prefix.clone(),
            humantime::format_duration(settings.op_timeout).to_string(),
            settings.pool_size,
        );
        match running {
            Some(running) if *running.settings() == settings => return Ok(Some(running.clone())),
            Some(_) => tracing::info!(
                key_prefix,
                op_timeout,
                pool_size,
                "redis settings changed (applied without restart); connecting with the new ones, the old connections close once requests in flight end"
            ),
            None => tracing::info!(key_prefix, op_timeout, pool_size, "redis configured; connecting in the background"),
        }
        Redis::connect(settings).map(Some)
    }

    /// What this handle was built from.
    pub fn settings(&self) -> &RedisSettings {
        &self.0.settings
    }

    /// Whether calls currently go to Redis (false until the first probe has answered).
    pub fn is_up(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == UP
    }

    /// `key_prefix` + `kind` + `:` + the id in hex: never user text.
    pub(crate) fn key(&self, kind: &str, id: u128) -> String {
        format!("{}{kind}:{id:032x}", self.0.settings.key_prefix)
    }

    /// Runs one call for a request on the next connection, bounded by `op_timeout`. `None`
    /// when Redis is down, failed or was too slow: counted under `op`, and a failure of Redis
    /// itself (not of the command) marks it down until the probe sees it answer again.
    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Option<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let slots = self.0.slots.len();
        let at = match slots {
            1 => 0,
            _ => 1 + self.0.next.fetch_add(1, Ordering::Relaxed) % (slots - 1),
        };
        self.run(op, at, self.0.settings.op_timeout, call).await
    }

    /// Writes `bytes` on the connection kept for writes, bounded by `op_timeout` plus the time
    /// the bytes take at [`WRITE_BYTES_PER_SEC`] (a large answer is not a slow Redis).
    pub(crate) async fn write<F, Fut>(&self, op: &'static str, bytes: usize, call: F) -> Option<()>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<()>>,
    {
        let transfer = Duration::from_secs_f64(bytes as f64 / WRITE_BYTES_PER_SEC);
        self.run(op, 0, self.0.settings.op_timeout + transfer, call)
            .await
    }

    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        at: usize,
        bound: Duration,
        call: F,
    ) -> Option<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.0;
        if inner.state.load(Ordering::Acquire) != UP {
            count_error(op);
            return None;
        }
        let connection = ConnectionManager::clone(&inner.slots[at].manager.load());
        let answer = async {
            match call(connection.clone()).await {
                // A connection closed while idle (a server or load balancer timeout) is not
                // Redis being down: the manager is already reconnecting, so ask once more.
                Err(error) if error.is_connection_dropped() => call(connection).await,
                answer => answer,
            }
        };
        match tokio::time::timeout(bound, answer).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                count_error(op);
                if unavailable(&error) {
                    inner.mark_down(&error.to_string());
                } else {
                    tracing::debug!(op, %error, "redis command failed");
                }
                None
            }
            Err(_) => {
                count_error(op);
                inner.mark_down("a call took longer than op_timeout");
                None
            }
        }
    }
}

fn count_error(op: &'static str) {
    metrics::counter!(super::REDIS_ERRORS, "op" => op).increment(1);
}

/// Whether an error says Redis cannot be reached (rather than that one command was refused).
fn unavailable(error: &RedisError) -> bool {
    error.is_io_error() || error.is_timeout() || error.is_unrecoverable_error()
}

/// One reconnecting multiplexed connection, not yet connected. A reconnection is one attempt,
/// without retries of its own: calls waiting for it would wait through its backoff, while the
/// probe already asks again with backoff as long as Redis is down.
fn manager(client: &::redis::Client) -> Result<ConnectionManager, String> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // Each call has its own `op_timeout`; the probe has `PROBE_TIMEOUT`.
        .set_response_timeout(None)
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client.clone(), config)
        // The error's category only: its details could quote the URL.
        .map_err(|e| format!("redis: cannot set up a connection: {:?}", e.kind()))
}

impl Inner {
    fn mark_up(&self) {
        let before = self.state.swap(UP, Ordering::AcqRel);
        if before != UP {
            publish_up(-1);
            tracing::info!("redis is available; shared limits, budgets and cache tier 2 are on");
        }
    }

    fn mark_down(&self, reason: &str) {
        let before = self.state.swap(DOWN, Ordering::AcqRel);
        if before != DOWN {
            if before == UP {
                publish_up(1);
            }
            tracing::warn!(
                reason,
                "redis is unavailable; serving without it (per-replica limits and budgets, no cache tier 2) and reconnecting"
            );
            self.wake.notify_one();
        }
    }

    /// PINGs every connection at once; replaces one that keeps timing out.
    async fn probe(&self) -> Result<(), String> {
        let mut pings = JoinSet::new();
        for (at, slot) in self.slots.iter().enumerate() {
            let mut connection = ConnectionManager::clone(&slot.manager.load());
            pings.spawn(async move {
                let ping = ::redis::cmd("PING");
                let answer = async {
                    // A connection that had failed answers with that failure once, and starts
                    // connecting again: the second PING waits for that attempt.
                    match ping.query_async::<()>(&mut connection).await {
                        Err(error) if !error.is_timeout() => {
                            ping.query_async::<()>(&mut connection).await
                        }
                        answer => answer,
                    }
                };
                (at, tokio::time::timeout(PROBE_TIMEOUT, answer).await)
            });
        }
        let mut failure = None;
        while let Some(joined) = pings.join_next().await {
            let Ok((at, result)) = joined else {
                continue;
            };
            let slot = &self.slots[at];
            match result {
                Ok(Ok(())) => slot.timeouts.store(0, Ordering::Relaxed),
                Ok(Err(error)) => failure = Some(error.to_string()),
                Err(_) => {
                    failure = Some("no answer to PING".to_owned());
                    if slot.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= STUCK_PROBES {
                        slot.timeouts.store(0, Ordering::Relaxed);
                        if let Ok(fresh) = manager(&self.client) {
                            slot.manager.store(Arc::new(fresh));
                        }
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) != UP {
            publish_up(-1);
        }
        // Lets the probe see that its handle is gone.
        self.wake.notify_one();
    }
}

/// The background probe: idle while Redis is up; while it is down (or not yet reached), PINGs
/// with backoff until it answers. Ends when the last handle is dropped.
async fn watch(handle: Weak<Inner>, wake: Arc<Notify>) {
    let mut delay = PROBE_MIN;
    let mut first = true;
    loop {
        loop {
            match handle.upgrade() {
                None => return,
                Some(inner) if inner.state.load(Ordering::Acquire) == UP => {}
                Some(_) => break,
            }
            wake.notified().await;
        }
        if !first {
            // A single slow call marks Redis down; give it a moment before asking again.
            tokio::time::sleep(delay).await;
        }
        first = false;
        let Some(inner) = handle.upgrade() else {
            return;
        };
        match inner.probe().await {
            Ok(()) => {
                inner.mark_up();
                delay = PROBE_MIN;
            }
            Err(reason) => {
                inner.mark_down(&reason);
                delay = (delay * 2).min(PROBE_MAX);
            }
        }
    }
}
