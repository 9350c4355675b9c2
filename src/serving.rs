//! The runtimes that serve requests. With `server.worker_threads` above 1 each serving thread
//! runs a current-thread runtime of its own, as nginx runs its workers: a client connection is
//! handed to the runtime with the fewest open connections when it is accepted and stays there,
//! and every runtime keeps its own upstream connections (see `upstream::UpstreamClient`), so one
//! thread drives a request, the upstream connection it goes out on and its answer, with no
//! hand-off between threads on the way.
//!
//! With one thread (the default) nothing is installed here: there is one runtime, index 0.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

struct Serving {
    handle: Handle,
    /// Client connections open on this runtime.
    open: AtomicUsize,
}

static RUNTIMES: OnceLock<Vec<Serving>> = OnceLock::new();

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Makes `handles` the serving runtimes, the first one the main runtime (which also runs the
/// admin listener and the background tasks). Once per process, before anything is served; a
/// second call is ignored and answers `false`.
pub fn install(handles: Vec<Handle>) -> bool {
    let runtimes = handles
        .into_iter()
        .map(|handle| Serving {
            handle,
            open: AtomicUsize::new(0),
        })
        .collect();
    RUNTIMES.set(runtimes).is_ok()
}

/// Marks the calling thread as the one driving serving runtime `index`.
pub fn enter(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// How many serving runtimes there are (1 unless [`install`]ed).
pub fn count() -> usize {
    RUNTIMES.get().map_or(1, |r| r.len().max(1))
}

/// The serving runtime the calling thread drives (0 on any other thread).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Where a new client connection goes: the runtime with the fewest open connections, with a
/// guard that counts the connection there until it is dropped. `None` with one runtime.
pub fn place() -> Option<(Handle, Placed)> {
    let runtimes = RUNTIMES.get().filter(|r| r.len() > 1)?;
    let (index, runtime) = runtimes
        .iter()
        .enumerate()
        .min_by_key(|(_, r)| r.open.load(Ordering::Relaxed))?;
    runtime.open.fetch_add(1, Ordering::Relaxed);
    Some((runtime.handle.clone(), Placed(index)))
}

/// One client connection counted on a serving runtime.
pub struct Placed(usize);

impl Placed {
    /// Whether the connection was placed on the runtime the calling thread drives.
    pub fn is_here(&self) -> bool {
        self.0 == current()
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        if let Some(runtime) = RUNTIMES.get().and_then(|r| r.get(self.0)) {
            runtime.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
