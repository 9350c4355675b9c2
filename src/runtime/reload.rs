//! The live runtime state built from a config (routing table, upstream target, key, headers), and
//! its reloading: watching the config and key files, debouncing, validating, swapping it in whole.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::Runtime;
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

/// Bursts of file events (an editor's temp file and rename, the kubelet's symlink swap) settle
/// into one reload this long after the last event...
const DEBOUNCE: Duration = Duration::from_millis(150);
/// ...but never later than this after the first, so a steady trickle of events cannot starve it.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

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

    fn succeeded(&self) {
        self.clear_error();
        self.ok.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::record::metrics::RELOADS, "result" => "ok").increment(1);
    }

    fn clear_error(&self) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn failed(&self, reason: String) {
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
pub struct ReloadTrigger(Arc<Notify>);

impl ReloadTrigger {
    pub fn reload(&self) {
        self.0.notify_one();
    }
}

/// A config file, loaded and validated, ready to be served with live reload by
/// [`crate::serve_live`].
pub struct LiveConfig {
    path: PathBuf,
    config: Config,
    hash: String,
    watch_files: bool,
    trigger: ReloadTrigger,
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

fn parse(path: &Path, bytes: Vec<u8>) -> Result<Config, ConfigError> {
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::file(path, "not valid UTF-8"))?;
    Config::parse(&text).map_err(|error| error.in_file(path))
}

/// The hash of the API key file's bytes (`None` when the key comes from the environment or the
/// file cannot be read), so a reload can tell that the key rotated. Read *before* the runtime is
/// built: a rotation racing the build is then seen as a change by the next event.
fn key_hash(config: &Config) -> Option<String> {
    let path = config.upstream.api_key_file.as_ref()?;
    std::fs::read(path).ok().map(|bytes| content_hash(&bytes))
}

/// Settings baked into listeners, the accept loop, the logger or the cache at start-up. A reload
/// keeps their running values and says so.
fn keep_restart_only(new: &mut Config, running: &Config) -> Vec<&'static str> {
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
    kept
}

/// The directory to watch for `file`: Kubernetes volumes and editors replace files by renaming
/// (a `..data` symlink swap, a temp file moved over), which a watch on the file itself misses.
fn watch_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Builds the first runtime from `live` and the reloader that keeps it current.
pub(crate) fn start(live: LiveConfig, log: Arc<ReloadLog>) -> Result<(Runtime, Reloader), String> {
    let key_hash = key_hash(&live.config);
    let mut runtime = Runtime::build(live.config, None)?;
    runtime.origin = ConfigOrigin {
        source: Some(live.path.clone()),
        hash: Some(live.hash.clone()),
        loaded_at: SystemTime::now(),
        restart_pending: Vec::new(),
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let watcher = if live.watch_files {
        let watcher = notify::recommended_watcher(move |event| {
            // The receiver is gone only once the reloader stopped.
            let _ = events_tx.send(event);
        });
        match watcher {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "cannot watch files; reload with SIGHUP instead");
                None
            }
        }
    } else {
        None
    };
    let mut reloader = Reloader {
        path: live.path,
        log,
        trigger: live.trigger,
        attempted: live.hash.clone(),
        key_hash,
        watcher,
        watched: BTreeSet::new(),
        names: BTreeSet::new(),
        events,
    };
    // Watching before serving starts: an edit made once the listeners answer is never missed.
    reloader.follow(&runtime.config);
    Ok((runtime, reloader))
}

/// Watches the config file's directory (and the key file's), debounces, validates and swaps. One
/// task runs every reload, so reloads never race each other.
pub(crate) struct Reloader {
    path: PathBuf,
    log: Arc<ReloadLog>,
    trigger: ReloadTrigger,
    /// Hash of the config bytes last tried, valid or not: the same bytes are not tried twice.
    attempted: String,
    /// Hash of the key file the running runtime was built after reading.
    key_hash: Option<String>,
    watcher: Option<RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
    /// File names in the watched directories whose events matter.
    names: BTreeSet<OsString>,
    events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
}

impl Reloader {
    /// Reloads on file events and triggers until `stop` changes or its sender is dropped. The
    /// file watcher (and its thread) ends with it.
    pub(crate) async fn run(
        mut self,
        live: Arc<ArcSwap<Runtime>>,
        mut stop: watch::Receiver<bool>,
    ) {
        // A change between the first read and the watch being set up would otherwise be missed.
        self.reload(&live, "start-up check");
        let mut listening = self.watcher.is_some();
        let mut burst: Option<(Instant, Instant)> = None;
        loop {
            let due = burst.map(|(first, last)| (last + DEBOUNCE).min(first + DEBOUNCE_MAX));
            let trigger = self.trigger.0.clone();
            tokio::select! {
                _ = stop.changed() => break,
                () = trigger.notified() => {
                    burst = None;
                    self.reload(&live, "reload request");
                }
                event = self.events.recv(), if listening => match event {
                    Some(Ok(event)) => {
                        if self.concerns(&event) {
                            let now = Instant::now();
                            burst = Some(burst.map_or((now, now), |(first, _)| (first, now)));
                        }
                    }
                    Some(Err(error)) => tracing::warn!(%error, "file watch error"),
                    None => listening = false,
                },
                () = sleep_until_due(due) => {
                    burst = None;
                    self.reload(&live, "file change");
                }
            }
        }
        tracing::debug!("config watcher stopped");
    }

    /// Whether `event` may change the config or the key: writes, creates, renames and removals
    /// of those files, or of the `..data` machinery of a Kubernetes volume. Opens (our own reads
    /// among them) are not.
    fn concerns(&self, event: &notify::Event) -> bool {
        if event.need_rescan() {
            return true;
        }
        let relevant_kind = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        };
        relevant_kind
            && event.paths.iter().any(|path| {
                path.file_name().is_some_and(|name| {
                    self.names.contains(name) || name.as_encoded_bytes().starts_with(b"..")
                })
            })
    }

    /// One reload attempt: a changed config file is parsed, validated and swapped in; an
    /// unchanged one only has its key re-read. Nothing here runs on the request path.
    fn reload(&mut self, live: &ArcSwap<Runtime>, trigger: &'static str) {
        let running = live.load_full();
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let hash = content_hash(&bytes);
                if running.origin.hash.as_ref() == Some(&hash) && hash != self.attempted {
                    // Back to the running content after a rejected edit: nothing to rebuild, and
                    // the error no longer describes the file.
                    self.attempted = hash;
                    self.log.clear_error();
                } else if hash != self.attempted {
                    self.attempted = hash.clone();
                    match self.apply(live, &running, bytes, hash, trigger) {
                        Ok(()) => {
                            self.follow(&live.load().config);
                            return;
                        }
                        Err(error) => self.reject(error),
                    }
                }
            }
            Err(error) => {
                // Reported once per distinct failure, like a changed file.
                let seen = format!("unreadable: {error}");
                if seen != self.attempted {
                    self.attempted = seen;
                    self.reject(format!("{}: cannot read: {error}", self.path.display()));
                }
            }
        }
        self.refresh_key(live, &running, trigger);
        self.follow(&live.load().config);
    }

    fn apply(
        &mut self,
        live: &ArcSwap<Runtime>,
        running: &Runtime,
        bytes: Vec<u8>,
        hash: String,
        trigger: &'static str,
    ) -> Result<(), String> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            // Valid TOML, but in a running proxy far more likely a half-written file than a
            // wish to drop every route and setting.
            return Err(format!(
                "{}: the file is empty; an empty config is accepted only at start-up",
                self.path.display()
            ));
        }
        let mut config = parse(&self.path, bytes).map_err(|e| e.to_string())?;
        let kept = keep_restart_only(&mut config, &running.config);
        for key in &kept {
            tracing::warn!(
                file = %self.path.display(),
                key,
                "this setting changed in the file but applies only at restart; the running value stays"
            );
        }
        let key_hash = key_hash(&config);
        let mut runtime = Runtime::build(config, Some(running))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        runtime.origin = ConfigOrigin {
            source: Some(self.path.clone()),
            hash: Some(hash.clone()),
            loaded_at: SystemTime::now(),
            restart_pending: kept,
        };
        let routes = runtime.config.routes.len();
        live.store(Arc::new(runtime));
        self.key_hash = key_hash;
        self.log.succeeded();
        tracing::info!(file = %self.path.display(), %hash, routes, trigger, "config reloaded");
        Ok(())
    }

    fn reject(&mut self, reason: String) {
        tracing::error!(error = %reason, "config reload rejected; the previous config keeps serving");
        self.log.failed(reason);
    }

    /// Rebuilds the running config when only its key file changed (a rotated Secret).
    fn refresh_key(&mut self, live: &ArcSwap<Runtime>, running: &Runtime, trigger: &'static str) {
        let key_hash = key_hash(&running.config);
        if key_hash == self.key_hash {
            tracing::debug!(trigger, "config and key file unchanged; nothing to reload");
            return;
        }
        match Runtime::build(Config::clone(&running.config), Some(running)) {
            Ok(mut runtime) => {
                runtime.origin = ConfigOrigin {
                    loaded_at: SystemTime::now(),
                    ..running.origin.clone()
                };
                let upstream = runtime.upstreams.default_upstream();
                let present = upstream.key.is_some();
                let source = upstream.key_source.clone();
                live.store(Arc::new(runtime));
                self.key_hash = key_hash;
                self.log.succeeded();
                tracing::info!(%source, present, trigger, "API key re-read");
            }
            // The running config built once, so only a new upstream client could fail here.
            Err(error) => self.reject(format!("{}: {error}", self.path.display())),
        }
    }

    /// Points the watches at the directories of the config file and of the running config's key
    /// file, which a reload may have moved.
    fn follow(&mut self, config: &Config) {
        let key_file = config.upstream.api_key_file.as_deref();
        self.names = [Some(self.path.as_path()), key_file]
            .into_iter()
            .flatten()
            .filter_map(|path| path.file_name().map(OsString::from))
            .collect();
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let wanted: BTreeSet<PathBuf> = [Some(self.path.as_path()), key_file]
            .into_iter()
            .flatten()
            .map(watch_dir)
            .collect();
        for dir in self.watched.difference(&wanted) {
            if let Err(error) = watcher.unwatch(dir) {
                tracing::debug!(dir = %dir.display(), %error, "cannot stop watching");
            }
        }
        self.watched.retain(|dir| wanted.contains(dir));
        for dir in wanted {
            if self.watched.contains(&dir) {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), "watching for config changes");
                    self.watched.insert(dir);
                }
                // Tried again after the next reload; SIGHUP still works meanwhile.
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch the directory")
                }
            }
        }
    }
}

async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
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
             [cache]\nmax_bytes = 10\n[log]\nlevel = \"debug\"\n[[routes]]\nname = \"r\"\n",
        )
        .unwrap();
        let kept = keep_restart_only(&mut new, &running);
        assert_eq!(
            kept,
            [
                "server.listen",
                "server.header_read_timeout",
                "cache.max_bytes",
                "log.level"
            ]
        );
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(
            new.server.header_read_timeout,
            running.server.header_read_timeout
        );
        assert_eq!(new.cache.max_bytes, running.cache.max_bytes);
        assert_eq!(new.log.level, running.log.level);
        // Everything else is live.
        assert_eq!(new.server.max_body_bytes, 5);
        assert_eq!(new.routes.len(), 1);
    }

    #[test]
    fn the_watched_directory_is_the_files_parent() {
        assert_eq!(watch_dir(Path::new("proxy.toml")), PathBuf::from("."));
        assert_eq!(
            watch_dir(Path::new("/etc/proxy/proxy.toml")),
            PathBuf::from("/etc/proxy")
        );
    }
}
