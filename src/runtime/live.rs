//! A config file as loaded for live serving, and what reloads have done with it: its identity
//! (content hash, load time, restart-only keys kept), the reload counts and last error, and the
//! trigger that asks for a reload.

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::config::{Config, ConfigError};

/// Where the running config came from, shown on the admin port's `/config`.
#[derive(Debug, Clone)]
pub struct ConfigOrigin {
    /// The file, or `None` for a config handed to [`crate::serve`] in memory.
    pub source: Option<PathBuf>,
    /// [`content_hash`] of the file's bytes, or `None` for an in-memory config.
    pub hash: Option<String>,
    /// When this runtime was built (start-up, or the reload that swapped it in).
    pub loaded_at: SystemTime,
    /// Restart-only keys whose value in the file differs from the running one.
    pub restart_pending: Vec<&'static str>,
}

impl ConfigOrigin {
    pub(crate) fn in_memory() -> ConfigOrigin {
        ConfigOrigin {
            source: None,
            hash: None,
            loaded_at: SystemTime::now(),
            restart_pending: Vec::new(),
        }
    }
}

/// A 128-bit hex identity of a config file's bytes: two SipHash passes with different seeds. It
/// tells versions apart within one build of the proxy; it is not a cryptographic digest and may
/// differ between Rust releases.
pub fn content_hash(bytes: &[u8]) -> String {
    let half = |seed: u64| {
        let mut hasher = DefaultHasher::new();
        hasher.write_u64(seed);
        hasher.write(bytes);
        hasher.finish()
    };
    format!(
        "{:016x}{:016x}",
        half(0x6f70_656e_726f_7574),
        half(0x7072_6f78_792e_746f)
    )
}

/// Reload outcomes since start-up, for `/config` (the metric counts the same).
#[derive(Debug, Default)]
pub struct ReloadLog {
    ok: AtomicU64,
    error: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReloadLog {
    /// Reloads that swapped in a new runtime.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Reloads rejected (the previous config kept serving).
    pub fn errors(&self) -> u64 {
        self.error.load(Ordering::Relaxed)
    }

    /// Why the latest reload attempt failed; `None` once a later one succeeded.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn succeeded(&self) {
        self.clear_error();
        self.ok.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::record::metrics::RELOADS, "result" => "ok").increment(1);
    }

    pub(super) fn clear_error(&self) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub(super) fn failed(&self, reason: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.error.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::record::metrics::RELOADS, "result" => "error").increment(1);
    }
}

/// Asks a running proxy to reload now, without waiting for a file event (SIGHUP uses it).
/// Requests made while a reload runs coalesce into one more.
#[derive(Debug, Clone, Default)]
pub struct ReloadTrigger(pub(super) Arc<Notify>);

impl ReloadTrigger {
    pub fn reload(&self) {
        self.0.notify_one();
    }
}

/// A config file, loaded and validated, ready to be served with live reload by
/// [`crate::serve_live`].
pub struct LiveConfig {
    pub(super) path: PathBuf,
    pub(super) config: Config,
    pub(super) hash: String,
    pub(super) watch_files: bool,
    pub(super) trigger: ReloadTrigger,
}

impl LiveConfig {
    /// Reads and validates `path` (the same checks as `--check`).
    pub fn load(path: impl Into<PathBuf>) -> Result<LiveConfig, ConfigError> {
        let path = path.into();
        let bytes = std::fs::read(&path)
            .map_err(|e| ConfigError::file(&path, format!("cannot read: {e}")))?;
        let hash = content_hash(&bytes);
        let config = parse(&path, bytes)?;
        Ok(LiveConfig {
            path,
            config,
            hash,
            watch_files: true,
            trigger: ReloadTrigger::default(),
        })
    }

    /// The config as loaded, before serving starts (for binding listeners and logging set-up).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`content_hash`] of the file as loaded.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether file changes trigger reloads (the default). Without it, only the
    /// [`ReloadTrigger`] (SIGHUP) does.
    pub fn watch_files(mut self, watch: bool) -> LiveConfig {
        self.watch_files = watch;
        self
    }

    /// A handle that asks the proxy to reload; it works before and after serving starts.
    pub fn trigger(&self) -> ReloadTrigger {
        self.trigger.clone()
    }
}

pub(super) fn parse(path: &Path, bytes: Vec<u8>) -> Result<Config, ConfigError> {
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::file(path, "not valid UTF-8"))?;
    Config::parse(&text).map_err(|error| error.in_file(path))
}

/// A hash over the bytes of every key file (`None` when every key comes from the environment),
/// so a reload can tell that a key rotated. Read *before* the runtime is built: a rotation racing
/// the build is then seen as a change by the next event.
pub(super) fn key_hash(config: &Config) -> Option<String> {
    let files = config.key_files();
    if files.is_empty() {
        return None;
    }
    let mut all = Vec::new();
    for path in files {
        // An unreadable file hashes differently from any content, and from a readable one.
        match std::fs::read(path) {
            Ok(bytes) => all.extend_from_slice(content_hash(&bytes).as_bytes()),
            Err(_) => all.extend_from_slice(b"-"),
        }
    }
    Some(content_hash(&all))
}

/// Settings baked into listeners, the accept loop, the logger, the cache or the Batch API at
/// start-up. A reload keeps their running values and says so.
pub(super) fn keep_restart_only(new: &mut Config, running: &Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $key:literal) => {
            if new.$($field).+ != running.$($field).+ {
                new.$($field).+ = running.$($field).+.clone();
                kept.push($key);
            }
        };
    }
    keep!(server.listen, "server.listen");
    keep!(server.admin_listen, "server.admin_listen");
    keep!(server.max_connections, "server.max_connections");
    keep!(server.admin_max_connections, "server.admin_max_connections");
    keep!(server.header_read_timeout, "server.header_read_timeout");
    keep!(server.max_header_bytes, "server.max_header_bytes");
    keep!(server.max_headers, "server.max_headers");
    keep!(
        server.http2_max_concurrent_streams,
        "server.http2_max_concurrent_streams"
    );
    keep!(cache.max_bytes, "cache.max_bytes");
    keep!(cache.max_entry_bytes, "cache.max_entry_bytes");
    keep!(log.format, "log.format");
    keep!(log.level, "log.level");
    keep!(log.access_buffer_bytes, "log.access_buffer_bytes");
    keep!(log.access_flush_interval, "log.access_flush_interval");
    // The Batch API's store, workers and routes are set up once, at start-up.
    keep!(batch, "batch");
    // The exporter, its queue and its thread are built once with the process: tracing is
    // turned on, off or pointed elsewhere by a restart.
    keep!(otel, "otel");
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_128_bits_of_hex_and_tells_versions_apart() {
        let a = content_hash(b"[server]\n");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, content_hash(b"[server]\n"));
        assert_ne!(a, content_hash(b"[server] \n"));
    }

    #[test]
    fn restart_only_settings_keep_the_running_value() {
        let running = Config::default();
        let mut new = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 5\nheader_read_timeout = \"1s\"\n\
             [cache]\nmax_bytes = 10\n[log]\nlevel = \"debug\"\n[batch]\n[otel]\n[[routes]]\nname = \"r\"\n",
        )
        .unwrap();
        let kept = keep_restart_only(&mut new, &running);
        assert_eq!(
            kept,
            [
                "server.listen",
                "server.header_read_timeout",
                "cache.max_bytes",
                "log.level",
                "batch",
                "otel"
            ]
        );
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(
            new.server.header_read_timeout,
            running.server.header_read_timeout
        );
        assert_eq!(new.cache.max_bytes, running.cache.max_bytes);
        assert_eq!(new.log.level, running.log.level);
        assert_eq!(new.batch, None);
        assert_eq!(new.otel, None);
        // Everything else is live.
        assert_eq!(new.server.max_body_bytes, 5);
        assert_eq!(new.routes.len(), 1);
    }
}
