//! Reloading: watching the config and key files, debouncing, validating, building the new runtime
//! off the request path and swapping it in whole. A bad config keeps the running one serving.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::live::{content_hash, keep_restart_only, key_hash, parse};
use super::Runtime;
use super::{ConfigOrigin, LiveConfig, ReloadLog, ReloadTrigger};
use crate::config::Config;

/// Bursts of file events (an editor's temp file and rename, the kubelet's symlink swap) settle
/// into one reload this long after the last event...
const DEBOUNCE: Duration = Duration::from_millis(150);
/// ...but never later than this after the first, so a steady trickle of events cannot starve it.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

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
                let present = upstream.ready();
                let source = upstream.key_sources().join(", ");
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
    /// files, which a reload may have moved.
    fn follow(&mut self, config: &Config) {
        let files: Vec<&Path> = std::iter::once(self.path.as_path())
            .chain(config.key_files())
            .collect();
        self.names = files
            .iter()
            .filter_map(|path| path.file_name().map(OsString::from))
            .collect();
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let wanted: BTreeSet<PathBuf> = files.iter().map(|path| watch_dir(path)).collect();
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
    fn the_watched_directory_is_the_files_parent() {
        assert_eq!(watch_dir(Path::new("proxy.toml")), PathBuf::from("."));
        assert_eq!(
            watch_dir(Path::new("/etc/proxy/proxy.toml")),
            PathBuf::from("/etc/proxy")
        );
    }
}
