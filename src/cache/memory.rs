//! The first tier: answers in process memory on moka, bounded by their weight in bytes, each
//! expiring after its own TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use moka::notification::RemovalCause;
use moka::sync::Cache;

use super::key::CacheKey;
use super::{Store, StoreFuture};

/// Memory an entry costs beyond its bytes (see [`CachedAnswer::weight`]).
const ENTRY_OVERHEAD: usize = 900;

/// A complete, successful answer as stored.
#[derive(Debug)]
pub struct CachedAnswer {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The JSON body, or the whole SSE stream as it was received (ending with `data: [DONE]`).
    pub body: Bytes,
    pub model: Option<String>,
    pub stored_at: Instant,
    ttl: Duration,
}

impl CachedAnswer {
    /// Stores owned, right-sized copies: the body and header values handed in may be slices of
    /// a much larger read buffer, which an entry must not keep alive.
    pub fn new(
        headers: &HeaderMap,
        body: Bytes,
        model: Option<String>,
        ttl: Duration,
    ) -> CachedAnswer {
        // Only what describes the body: hop-by-hop and per-response headers are not replayed.
        // Which upstream answered is part of the answer, as its model is.
        let kept = [
            http::header::CONTENT_TYPE,
            http::header::CACHE_CONTROL,
            HeaderName::from_static("x-proxy-upstream"),
        ];
        CachedAnswer {
            headers: kept
                .iter()
                .filter_map(|name| {
                    let value = HeaderValue::from_bytes(headers.get(name)?.as_bytes()).ok()?;
                    Some((name.clone(), value))
                })
                .collect(),
            body: Bytes::copy_from_slice(&body),
            model,
            stored_at: Instant::now(),
            ttl,
        }
    }

    /// An answer read back from another tier: already owned, kept `ttl` from now.
    pub fn stored(
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
        model: Option<String>,
        stored_at: Instant,
        ttl: Duration,
    ) -> CachedAnswer {
        CachedAnswer {
            headers,
            body,
            model,
            stored_at,
            ttl,
        }
    }

    /// How long the answer is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What the entry costs in memory: its bytes, and the bookkeeping around them (the answer's
    /// own allocations, the key, and moka's per-entry nodes for the map, the eviction order and
    /// the expiry timer: about 900 bytes, measured by `tests/cache_memory.rs`).
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 48)
            .sum();
        let model = self.model.as_ref().map_or(0, String::len);
        let size = self.body.len() + headers + model + ENTRY_OVERHEAD;
        u32::try_from(size).unwrap_or(u32::MAX)
    }
}

struct PerEntryTtl;

impl moka::Expiry<CacheKey, Arc<CachedAnswer>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<CachedAnswer>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &Arc<CachedAnswer>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        // A refreshed entry (`Cache-Control: no-cache`) lives for its route's full TTL again.
        Some(value.ttl)
    }
}

/// Answers in memory, bounded by `cache.max_bytes`.
pub struct MemoryStore {
    entries: Cache<CacheKey, Arc<CachedAnswer>>,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> MemoryStore {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &CacheKey, answer: &Arc<CachedAnswer>| answer.weight())
            .expire_after(PerEntryTtl)
            .eviction_listener(|_, _, cause| {
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                crate::record::metrics::cache_eviction(cause);
            })
            .build();
        MemoryStore { entries }
    }

    /// The answer under `key`, without waiting.
    pub fn get_now(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.entries.get(key)
    }

    /// Publishes entry count and stored bytes (moka updates them lazily; this runs its upkeep).
    pub fn publish_gauges(&self) {
        self.entries.run_pending_tasks();
        crate::record::metrics::cache_size(
            self.entries.entry_count(),
            self.entries.weighted_size(),
        );
    }
}

impl Store for MemoryStore {
    fn tier(&self) -> &'static str {
        super::MEMORY
    }

    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a> {
        let found = self.get_now(key);
        Box::pin(std::future::ready(found))
    }

    fn insert(&self, key: CacheKey, answer: Arc<CachedAnswer>) {
        self.entries.insert(key, answer);
    }
}
