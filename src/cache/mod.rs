//! The in-process response cache on moka: keys, weights by stored bytes, per-route TTLs, the
//! coalescing of identical concurrent misses, and recording streamed answers for replay.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use moka::notification::RemovalCause;
use moka::sync::Cache;
use tokio::sync::watch;

/// Identifies a cacheable request: 128 bits of SipHash over the fields listed in [`CacheKey::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(u128);

impl CacheKey {
    /// Hashes, in order: the upstream path with its query, the attempt chain (the models the
    /// route would try), the caller's identity (when callers bring their own keys or tokens), and
    /// the JSON body in canonical form (object keys sorted, no insignificant whitespace), so
    /// that key order and formatting do not matter. `None` when the body is not JSON.
    pub fn new(path: &str, chain: &[&str], tenant: Option<&[u8]>, body: &[u8]) -> Option<CacheKey> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let mut hasher = KeyHasher::new();
        hasher.field(path.as_bytes());
        for model in chain {
            hasher.field(model.as_bytes());
        }
        hasher.field(b"");
        match tenant {
            Some(tenant) => {
                hasher.field(b"tenant");
                hasher.field(tenant);
            }
            None => hasher.field(b"shared"),
        }
        canonical(&value, &mut hasher).ok()?;
        Some(CacheKey(hasher.finish()))
    }
}

/// Two SipHash states with different seeds, for a 128-bit key that collisions cannot reach.
struct KeyHasher(DefaultHasher, DefaultHasher);

impl KeyHasher {
    fn new() -> KeyHasher {
        let mut second = DefaultHasher::new();
        second.write_u64(0x9e37_79b9_7f4a_7c15);
        KeyHasher(DefaultHasher::new(), second)
    }

    /// A length-prefixed field, so that field boundaries cannot be shifted.
    fn field(&mut self, bytes: &[u8]) {
        self.0.write_usize(bytes.len());
        self.1.write_usize(bytes.len());
        self.0.write(bytes);
        self.1.write(bytes);
    }

    fn finish(&self) -> u128 {
        (u128::from(self.0.finish()) << 64) | u128::from(self.1.finish())
    }
}

impl Write for KeyHasher {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.write(bytes);
        self.1.write(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `value` as compact JSON with object keys in sorted order.
fn canonical(value: &serde_json::Value, out: &mut KeyHasher) -> std::io::Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.write_all(b"{")?;
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                serde_json::to_writer(&mut *out, key)?;
                out.write_all(b":")?;
                if let Some(value) = map.get(key) {
                    canonical(value, out)?;
                }
            }
            out.write_all(b"}")
        }
        serde_json::Value::Array(items) => {
            out.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                canonical(item, out)?;
            }
            out.write_all(b"]")
        }
        scalar => serde_json::to_writer(&mut *out, scalar).map_err(std::io::Error::from),
    }
}

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
        let kept = [http::header::CONTENT_TYPE, http::header::CACHE_CONTROL];
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

/// The in-flight misses that identical requests may wait for.
type Fills = Mutex<HashMap<CacheKey, watch::Receiver<Option<Arc<CachedAnswer>>>>>;

/// The process's response cache; it outlives config reloads.
pub struct ResponseCache {
    entries: Cache<CacheKey, Arc<CachedAnswer>>,
    fills: Fills,
    /// Answers larger than this are not stored.
    pub max_entry_bytes: usize,
}

impl ResponseCache {
    pub fn new(max_bytes: u64, max_entry_bytes: usize) -> ResponseCache {
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
        ResponseCache {
            entries,
            fills: Mutex::new(HashMap::new()),
            max_entry_bytes,
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: CacheKey, answer: CachedAnswer) {
        if answer.body.len() <= self.max_entry_bytes {
            self.entries.insert(key, Arc::new(answer));
        }
    }

    /// Joins an identical miss already in flight, or becomes the one that fills `key`.
    pub fn join_or_fill(self: &Arc<Self>, key: CacheKey) -> Fill {
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
            key,
            sender,
        })
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
    key: CacheKey,
    sender: watch::Sender<Option<Arc<CachedAnswer>>>,
}

impl FillGuard {
    pub fn complete(self, answer: CachedAnswer) {
        let answer = Arc::new(answer);
        if answer.body.len() <= self.cache.max_entry_bytes {
            self.cache.entries.insert(self.key, answer.clone());
        }
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

/// Records a streamed answer as it passes through, to store it once it ends with `[DONE]`.
pub struct StreamRecorder {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    headers: HeaderMap,
    model: Option<String>,
    ttl: Duration,
    bytes: BytesMut,
    overflowed: bool,
}

impl StreamRecorder {
    pub fn new(
        cache: Arc<ResponseCache>,
        key: CacheKey,
        headers: HeaderMap,
        model: Option<String>,
        ttl: Duration,
    ) -> StreamRecorder {
        StreamRecorder {
            cache,
            key,
            headers,
            model,
            ttl,
            bytes: BytesMut::new(),
            overflowed: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.bytes.len() + data.len() > self.cache.max_entry_bytes {
            self.overflowed = true;
            self.bytes = BytesMut::new();
            return;
        }
        self.bytes.extend_from_slice(data);
    }

    /// Stores the stream if it completed (`[DONE]` seen, no error) and fit.
    pub fn finish(self, complete: bool) {
        if complete && !self.overflowed {
            let answer =
                CachedAnswer::new(&self.headers, self.bytes.freeze(), self.model, self.ttl);
            self.cache.insert(self.key, answer);
        }
    }
}

/// How the client's `Cache-Control` asks the cache to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Normal,
    /// `no-cache`: do not answer from the cache, but store the fresh answer.
    Refresh,
    /// `no-store`: neither read nor write.
    Bypass,
}

pub fn directive(headers: &HeaderMap) -> Directive {
    let mut directive = Directive::Normal;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
            match token.as_str() {
                "no-store" => return Directive::Bypass,
                "no-cache" | "max-age=0" => directive = Directive::Refresh,
                _ => {}
            }
        }
    }
    directive
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: &str) -> Option<CacheKey> {
        CacheKey::new("/chat/completions", &["m"], None, body.as_bytes())
    }

    #[test]
    fn key_ignores_order_and_whitespace() {
        let a = key(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#);
        let b = key("{ \"temperature\" : 0,\n \"messages\": [ {\"content\":\"hi\", \"role\":\"user\"} ], \"model\":\"m\" }");
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_ne!(
            a,
            key(r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#)
        );
        assert_ne!(
            a,
            key(r#"{"model":"m","messages":[{"content":"hi","role":"user"}],"temperature":1}"#)
        );
        assert_eq!(key("not json"), None);
    }

    #[test]
    fn key_separates_paths_chains_and_tenants() {
        let body = br#"{"model":"m"}"#;
        let base = CacheKey::new("/chat/completions", &["a", "b"], None, body);
        assert_ne!(base, CacheKey::new("/completions", &["a", "b"], None, body));
        assert_ne!(base, CacheKey::new("/chat/completions", &["a"], None, body));
        assert_ne!(
            base,
            CacheKey::new("/chat/completions", &["ab"], None, body)
        );
        let alice = CacheKey::new("/chat/completions", &["a", "b"], Some(b"alice"), body);
        assert_ne!(base, alice);
        assert_ne!(
            alice,
            CacheKey::new("/chat/completions", &["a", "b"], Some(b"bob"), body)
        );
    }

    #[test]
    fn cache_control_directives() {
        let mut headers = HeaderMap::new();
        assert_eq!(directive(&headers), Directive::Normal);
        headers.insert("cache-control", HeaderValue::from_static("No-Cache"));
        assert_eq!(directive(&headers), Directive::Refresh);
        headers.append(
            "cache-control",
            HeaderValue::from_static("max-age=5, no-store"),
        );
        assert_eq!(directive(&headers), Directive::Bypass);
    }
}
