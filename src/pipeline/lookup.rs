//! The cache phase: looking a planned request up (memory first), coalescing identical misses,
//! answering a hit, and arranging for a miss's answer to be stored once it is complete.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::body::JsonBody;
use super::headers::{X_CACHE, X_CACHE_TIER, X_PROXY_ATTEMPTS, X_PROXY_MODEL};
use super::relay::ProxyBody;
use super::Shared;
use crate::cache::{
    CacheKey, CachedAnswer, Destination, Directive, Fill, FillGuard, StreamRecorder, Tier, Tiers,
    MEMORY,
};
use crate::record::{CacheResult, RequestRecord};

pub(super) enum Lookup {
    Hit(Arc<CachedAnswer>, Tier),
    /// Answered by an identical request in flight, after waiting for it.
    Waited(Arc<CachedAnswer>, Tier),
    Miss(Miss),
    Bypass,
}

/// A cacheable request the cache could not answer: where its answer goes once complete.
pub(super) struct Miss {
    key: CacheKey,
    ttl: Duration,
    tiers: Tiers,
    /// Set when identical requests wait for this one.
    fill: Option<FillGuard>,
}

impl Miss {
    /// Stores a complete successful answer: at once for a JSON body, at the event that completes
    /// it for a stream.
    pub(super) fn store(
        self,
        shared: &Shared,
        response: &mut Response<ProxyBody>,
        model: Option<String>,
    ) {
        if response.status() != StatusCode::OK || response.body().is_failure() {
            return;
        }
        if let Some(bytes) = response.body().complete_bytes() {
            let answer = CachedAnswer::new(response.headers(), bytes.clone(), model, self.ttl);
            match self.fill {
                Some(fill) => fill.complete(answer),
                None => shared.cache.insert(self.key, answer, &self.tiers),
            }
            return;
        }
        let to = Destination {
            cache: shared.cache.clone(),
            tiers: self.tiers,
            key: self.key,
            model,
            ttl: self.ttl,
        };
        let recorder = StreamRecorder::new(to, response.headers().clone());
        response.body_mut().record_stream(recorder);
    }
}

/// What identifies a cacheable request besides its body.
pub(super) struct Query<'a> {
    /// The client's path below `/v1`, with its query.
    pub(super) path: &'a str,
    /// Each planned attempt as `upstream/model`.
    pub(super) attempts: &'a [String],
    pub(super) tenant: Option<&'a [u8]>,
    pub(super) ttl: Duration,
    /// The tiers behind memory (the runtime's).
    pub(super) tiers: &'a Tiers,
    /// The body as every attempt sends it but for the model: with the route's body policy
    /// applied, so that requests the policy makes identical share an entry.
    pub(super) body: &'a [u8],
}

/// Looks the request up, honouring the client's `Cache-Control`. Identical non-streaming misses
/// in flight are coalesced: one goes upstream, the others wait for its answer. Streams are not
/// coalesced (a waiter's first token would wait for the leader's last), so identical concurrent
/// streams each go upstream, and the first to complete is stored.
pub(super) async fn lookup(
    shared: &Shared,
    query: Query<'_>,
    json: &JsonBody,
    headers: &HeaderMap,
    record: &mut RequestRecord,
) -> Lookup {
    let directive = crate::cache::directive(headers);
    let attempts: Vec<&str> = query.attempts.iter().map(String::as_str).collect();
    let key = match CacheKey::new(query.path, &attempts, query.tenant, query.body) {
        Some(key) if directive != Directive::Bypass => key,
        _ => return Lookup::Bypass,
    };
    let mut fill = None;
    if directive == Directive::Normal {
        if let Some((answer, tier)) = shared.cache.get(&key, query.tiers).await {
            return Lookup::Hit(answer, tier);
        }
        if !json.stream {
            match shared.cache.join_or_fill(key, query.tiers) {
                Fill::Lead(guard) => fill = Some(guard),
                Fill::Wait(mut receiver) => {
                    record.waits_for_fill();
                    if let Some(answer) = Fill::wait(&mut receiver).await {
                        return Lookup::Waited(answer, Tier(MEMORY));
                    }
                }
                Fill::Alone => {}
            }
        }
    }
    let (ttl, tiers) = (query.ttl, query.tiers.clone());
    Lookup::Miss(Miss {
        key,
        ttl,
        tiers,
        fill,
    })
}

pub(super) fn cached_response(
    answer: &CachedAnswer,
    tier: Tier,
    record: &mut RequestRecord,
) -> Response<ProxyBody> {
    record.served_model = answer.model.clone();
    record.cache = Some(CacheResult::Hit);
    record.cache_tier = Some(tier.0);
    let mut response = Response::new(ProxyBody::full(answer.body.clone()));
    let headers = response.headers_mut();
    for (name, value) in &answer.headers {
        headers.insert(name.clone(), value.clone());
    }
    let hit = CacheResult::Hit.header();
    headers.insert(X_CACHE.clone(), HeaderValue::from_static(hit));
    headers.insert(X_CACHE_TIER.clone(), HeaderValue::from_static(tier.0));
    headers.insert(
        header::AGE,
        HeaderValue::from(answer.stored_at.elapsed().as_secs()),
    );
    if let Some(model) = answer
        .model
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        headers.insert(X_PROXY_MODEL.clone(), model);
    }
    headers.insert(X_PROXY_ATTEMPTS.clone(), super::headers::count_value(0));
    response
}
