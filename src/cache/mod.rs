//! The response cache: keys (`key`), the stores behind one small trait, memory first (`memory`)
//! and further tiers after it, the coalescing of identical concurrent misses, and recording
//! streamed answers for replay.

mod key;
mod memory;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::HeaderMap;
use tokio::sync::watch;

pub use key::{directive, CacheKey, Directive};
pub use memory::{CachedAnswer, MemoryStore};

/// What a store's lookup resolves to.
pub type StoreFuture<'a> = Pin<Box<dyn Future<Output = Option<Arc<CachedAnswer>>> + Send + 'a>>;

/// Where answers are kept. An answer carries its own expiry (the route's TTL), so a store needs
/// nothing else to keep it the right time.
pub trait Store: Send + Sync {
    /// The tier's name, as the `x-cache-tier` header and metric labels show it.
    fn tier(&self) -> &'static str;
    /// The answer stored under `key`, if any (and if the store answers in time).
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a>;
    /// Keeps `answer` under `key` until it expires. Never waits: a slow store queues the write,
    /// or drops it.
    fn insert(&self, key: CacheKey, answer: Arc<CachedAnswer>);
}

/// Where a hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier(pub &'static str);

/// The first tier's name.
pub const MEMORY: &str = "memory";

/// The tiers behind memory, in the order they are asked (a runtime's: they follow its config).
pub type Tiers = Arc<[Arc<dyn Store>]>;

/// The in-flight misses that identical requests may wait for.
type Fills = Mutex<HashMap<CacheKey, watch::Receiver<Option<Arc<CachedAnswer>>>>>;

/// The process's response cache; it outlives config reloads.
pub struct ResponseCache {
    memory: MemoryStore,
    fills: Fills,
    /// Answers larger than this are not stored.
    pub max_entry_bytes: usize,
}

impl ResponseCache {
    pub fn new(max_bytes: u64, max_entry_bytes: usize) -> ResponseCache {
        ResponseCache {
            memory: MemoryStore::new(max_bytes),
            fills: Mutex::new(HashMap::new()),
            max_entry_bytes,
        }
    }

    /// The answer under `key` and the tier it came from: memory first, then each of `tiers` in
    /// turn; a hit in a further tier fills memory.
    pub async fn get(&self, key: &CacheKey, tiers: &Tiers) -> Option<(Arc<CachedAnswer>, Tier)> {
        if let Some(answer) = self.memory.get_now(key) {
            return Some((answer, Tier(self.memory.tier())));
        }
        for tier in tiers.iter() {
            if let Some(answer) = tier.get(key).await {
                self.memory.insert(*key, answer.clone());
                return Some((answer, Tier(tier.tier())));
            }
        }
        None
    }

    /// Stores a complete answer in memory and every one of `tiers` (when it is not too large).
    pub fn insert(&self, key: CacheKey, answer: CachedAnswer, tiers: &Tiers) {
        self.insert_shared(key, Arc::new(answer), tiers);
    }

    fn insert_shared(&self, key: CacheKey, answer: Arc<CachedAnswer>, tiers: &Tiers) {
        if answer.body.len() > self.max_entry_bytes {
            return;
        }
        self.memory.insert(key, answer.clone());
        for tier in tiers.iter() {
            tier.insert(key, answer.clone());
        }
    }

    /// Joins an identical miss already in flight, or becomes the one that fills `key`.
    pub fn join_or_fill(self: &Arc<Self>, key: CacheKey, tiers: &Tiers) -> Fill {
        let Ok(mut fills) = self.fills.lock() else {
            return Fill::Alone;
        };
        if let Some(receiver) = fills.get(&key) {
            return Fill::Wait(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        fills.insert(key, receiver);
        Fill::Lead(FillGuard {
            cache: self.clone(),
            tiers: tiers.clone(),
            key,
            sender,
        })
    }

    /// Publishes entry count and stored bytes of the memory tier.
    pub fn publish_gauges(&self) {
        self.memory.publish_gauges();
    }
}

/// The outcome of [`ResponseCache::join_or_fill`].
pub enum Fill {
    /// This request fills the entry; others wait for it.
    Lead(FillGuard),
    /// Another identical request is in flight: wait for its answer.
    Wait(watch::Receiver<Option<Arc<CachedAnswer>>>),
    /// Coalescing is unavailable; go alone.
    Alone,
}

impl Fill {
    /// Waits for the leader. `None` when it produced nothing cacheable (or went away): then the
    /// caller asks the upstream itself.
    pub async fn wait(
        receiver: &mut watch::Receiver<Option<Arc<CachedAnswer>>>,
    ) -> Option<Arc<CachedAnswer>> {
        loop {
            if let Some(answer) = receiver.borrow_and_update().clone() {
                return Some(answer);
            }
            receiver.changed().await.ok()?;
        }
    }
}

/// Held by the request filling an entry. Dropping it without [`FillGuard::complete`] (an error, a
/// client that went away) releases the waiters to go upstream themselves.
pub struct FillGuard {
    cache: Arc<ResponseCache>,
    tiers: Tiers,
    key: CacheKey,
    sender: watch::Sender<Option<Arc<CachedAnswer>>>,
}

impl FillGuard {
    pub fn complete(self, answer: CachedAnswer) {
        let answer = Arc::new(answer);
        self.cache
            .insert_shared(self.key, answer.clone(), &self.tiers);
        self.sender.send_replace(Some(answer));
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if let Ok(mut fills) = self.cache.fills.lock() {
            fills.remove(&self.key);
        }
    }
}

/// Where a complete answer goes: under `key`, into memory and `tiers`, for `ttl`.
pub struct Destination {
    pub cache: Arc<ResponseCache>,
    pub tiers: Tiers,
    pub key: CacheKey,
    pub model: Option<String>,
    pub ttl: Duration,
}

/// Records a streamed answer as it passes through, to store it once it ends with `[DONE]`.
pub struct StreamRecorder {
    to: Destination,
    headers: HeaderMap,
    bytes: BytesMut,
    overflowed: bool,
}

impl StreamRecorder {
    pub fn new(to: Destination, headers: HeaderMap) -> StreamRecorder {
        StreamRecorder {
            to,
            headers,
            bytes: BytesMut::new(),
            overflowed: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.bytes.len() + data.len() > self.to.cache.max_entry_bytes {
            self.overflowed = true;
            self.bytes = BytesMut::new();
            return;
        }
        self.bytes.extend_from_slice(data);
    }

    /// Stores the stream if it completed (`[DONE]` seen, no error) and fit.
    pub fn finish(self, complete: bool) {
        if complete && !self.overflowed {
            let to = self.to;
            let answer = CachedAnswer::new(&self.headers, self.bytes.freeze(), to.model, to.ttl);
            to.cache.insert(to.key, answer, &to.tiers);
        }
    }
}
