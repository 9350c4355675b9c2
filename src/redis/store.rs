//! The Redis tier as a cache store: the answer under the same 128-bit key as in memory, kept as
//! long as its route's TTL, written off the request path.

use std::sync::Arc;
use std::time::Instant;

use crate::cache::{CacheKey, CachedAnswer, Store, StoreFuture};

use super::{StoredAnswer, Tier2};

/// The tier's name, as `x-cache-tier` and the `tier` label show it.
pub const REDIS: &str = "redis";

impl Store for Tier2 {
    fn tier(&self) -> &'static str {
        REDIS
    }

    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a> {
        Box::pin(async move {
            let hit = Tier2::get(self, key.as_u128()).await?;
            let StoredAnswer {
                headers,
                body,
                model,
            } = hit.answer;
            // The copy in memory lives no longer than Redis keeps the answer.
            Some(Arc::new(CachedAnswer::stored(
                headers,
                body,
                model,
                Instant::now(),
                hit.ttl_left,
            )))
        })
    }

    fn insert(&self, key: CacheKey, answer: Arc<CachedAnswer>) {
        let stored = StoredAnswer {
            headers: answer.headers.clone(),
            body: answer.body.clone(),
            model: answer.model.clone(),
        };
        self.put(key.as_u128(), stored, answer.ttl());
    }
}
