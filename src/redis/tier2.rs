//! The second cache tier: complete answers in Redis under the in-memory cache's 128-bit keys, read
//! within `op_timeout` and written by a background writer fed through a bounded queue, so that
//! no answer ever waits for Redis.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::Redis;

/// Answers waiting to be written, at most.
pub const DEFAULT_QUEUE_ENTRIES: usize = 1024;
/// Bytes of answers waiting to be written, at most (a few large answers must not hold the
/// memory of a sidecar).
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// The first byte of a stored value: a value written in another layout is a miss, not an error.
const FORMAT_VERSION: u8 = 1;

/// A complete answer as the cache replays it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnswer {
    /// The headers that describe the body (content type, cache control).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A JSON answer, or a whole SSE stream as received (replayed event by event).
    pub body: Bytes,
    /// The model that served it.
    pub model: Option<String>,
}

/// A tier-2 hit: the answer, and how long Redis keeps it yet (the memory copy should not
/// outlive it).
#[derive(Debug, Clone, PartialEq)]
pub struct Tier2Hit {
    pub answer: StoredAnswer,
    pub ttl_left: Duration,
}

/// Everything but the body, which follows it unencoded.
#[derive(Serialize, Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
    model: Option<&'a str>,
}

impl StoredAnswer {
    /// `[version][postcard head][body]`.
    fn encode(&self) -> Option<Vec<u8>> {
        let head = Head {
            headers: self
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes()))
                .collect(),
            model: self.model.as_deref(),
        };
        let mut out = vec![FORMAT_VERSION];
        out = postcard::to_extend(&head, out).ok()?;
        out.extend_from_slice(&self.body);
        Some(out)
    }

    fn decode(stored: Vec<u8>) -> Option<StoredAnswer> {
        let stored = Bytes::from(stored);
        let (&version, rest) = stored.split_first()?;
        if version != FORMAT_VERSION {
            return None;
        }
        let (head, body): (Head<'_>, &[u8]) = postcard::take_from_bytes(rest).ok()?;
        let headers = head
            .headers
            .iter()
            .map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_bytes(value).ok()?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let model = head.model.map(str::to_owned);
        let body = stored.slice(stored.len() - body.len()..);
        Some(StoredAnswer {
            headers,
            body,
            model,
        })
    }

    fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        self.body.len() + headers + self.model.as_ref().map_or(0, String::len)
    }
}

struct Write {
    key: String,
    answer: StoredAnswer,
    ttl: Duration,
    size: usize,
}

/// The Redis cache tier. Built with the [`Redis`] it writes to; drop it to stop its writer
/// (after the queued writes).
pub struct Tier2 {
    redis: Redis,
    queue: mpsc::Sender<Write>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Tier2 {
    /// A tier with the default queue bounds. Needs a tokio runtime (it starts the writer).
    pub fn new(redis: Redis) -> Tier2 {
        Tier2::with_queue(redis, DEFAULT_QUEUE_ENTRIES, DEFAULT_QUEUE_BYTES)
    }

    /// A tier whose write queue holds at most `max_entries` answers and `max_bytes` bytes.
    pub fn with_queue(redis: Redis, max_entries: usize, max_bytes: usize) -> Tier2 {
        let (queue, writes) = mpsc::channel(max_entries.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write_all(redis.clone(), writes, queued_bytes.clone()));
        Tier2 {
            redis,
            queue,
            queued_bytes,
            max_bytes,
        }
    }

    /// The stored answer for `key` (a `CacheKey`'s 128 bits), within `op_timeout`. `None` on a
    /// miss, and when Redis is down or slow (then counted as an error of `op="cache_get"`).
    pub async fn get(&self, key: u128) -> Option<Tier2Hit> {
        let key = &self.redis.key("cache", key);
        let (stored, ttl_ms) = self
            .redis
            .call(super::op::CACHE_GET, |mut connection| async move {
                ::redis::pipe()
                    .get(key)
                    .pttl(key)
                    .query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
                    .await
            })
            .await?;
        let answer = StoredAnswer::decode(stored?)?;
        // PTTL is negative for a key without expiry or one gone since the GET.
        let ttl_left = Duration::from_millis(u64::try_from(ttl_ms).ok()?);
        Some(Tier2Hit { answer, ttl_left })
    }

    /// Queues `answer` to be stored for `ttl` (the route's `cache_ttl`) and returns at once. When
    /// the queue is full the answer is not stored, and counted in
    /// `openrouter_cache_tier2_writes_dropped_total`.
    pub fn put(&self, key: u128, answer: StoredAnswer, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let size = answer.size();
        let queued = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        let write = Write {
            key: self.redis.key("cache", key),
            answer,
            ttl,
            size,
        };
        if queued + size > self.max_bytes || self.queue.try_send(write).is_err() {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            metrics::counter!(super::TIER2_DROPPED).increment(1);
        }
    }
}

/// The writer: takes queued answers in order and writes up to `pool_size` at once on the
/// connection kept for writes, each bounded by `op_timeout` and its size. Ends when its
/// [`Tier2`] is dropped and the queue is empty.
async fn write_all(
    redis: Redis,
    mut writes: mpsc::Receiver<Write>,
    queued_bytes: Arc<AtomicUsize>,
) {
    let parallel = redis.settings().pool_size.max(1);
    let mut running = JoinSet::new();
    while let Some(write) = writes.recv().await {
        while running.len() >= parallel {
            running.join_next().await;
        }
        while running.try_join_next().is_some() {}
        let redis = redis.clone();
        let queued_bytes = queued_bytes.clone();
        running.spawn(async move {
            if let Some(value) = write.answer.encode() {
                let millis = u64::try_from(write.ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let (key, value) = (&write.key, &value);
                redis
                    .write(
                        super::op::CACHE_PUT,
                        value.len(),
                        |mut connection| async move {
                            ::redis::cmd("SET")
                                .arg(key)
                                .arg(value)
                                .arg("PX")
                                .arg(millis)
                                .query_async::<()>(&mut connection)
                                .await
                        },
                    )
                    .await;
            }
            queued_bytes.fetch_sub(write.size, Ordering::AcqRel);
        });
    }
    while running.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_survive_the_format() {
        let answer = StoredAnswer {
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            )],
            body: Bytes::from_static(b"data: {\"x\":1}\n\ndata: [DONE]\n\n"),
            model: Some("openai/gpt-4o".to_owned()),
        };
        let stored = answer.encode().unwrap();
        assert_eq!(StoredAnswer::decode(stored.clone()), Some(answer));
        let mut other = stored;
        other[0] = FORMAT_VERSION + 1;
        assert_eq!(
            StoredAnswer::decode(other),
            None,
            "another layout is a miss"
        );
        assert_eq!(StoredAnswer::decode(vec![FORMAT_VERSION, 0xff]), None);
    }
}
