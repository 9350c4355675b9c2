//! The request pipeline: check the path and the caller, read the body once, route, apply limits,
//! answer from the cache or send the attempts (see `attempts`), and hand the answer back.

pub mod attempts;
pub mod body;
pub mod intake;
pub mod relay;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::pipeline::attempts::{run_chain, Outbound};
use crate::pipeline::body::{BodyError, JsonBody};
use crate::cache::{
    CacheKey, CachedAnswer, Directive, Fill, FillGuard, ResponseCache, StreamRecorder,
};
use crate::config::UpstreamAuth;
use crate::error::ProxyError;
use crate::health::Health;
use crate::pipeline::intake::{BodyLimits, Upload};
use crate::limits::{Limits, Permit, Rejection};
use crate::record::RequestRecord;
use crate::pipeline::relay::ProxyBody;
use crate::runtime::Runtime;
use crate::runtime::router::{RequestFacts, Route};
use crate::shape::Shape;

/// State shared by every request: the live runtime (swapped whole on reload), model health
/// (which outlives reloads) and the drain flag.
pub struct Shared {
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub health: Health,
    pub limits: Limits,
    /// Sized at start-up from `[cache]`; entries outlive reloads.
    pub cache: Arc<ResponseCache>,
    pub draining: AtomicBool,
    request_ids: AtomicU64,
    id_prefix: u64,
}

impl Shared {
    pub fn new(runtime: Runtime) -> Shared {
        let id_prefix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let cache = Arc::new(ResponseCache::new(
            runtime.config.cache.max_bytes,
            runtime.config.cache.max_entry_bytes,
        ));
        Shared {
            runtime: Arc::new(ArcSwap::from_pointee(runtime)),
            health: Health::default(),
            limits: Limits::default(),
            cache,
            draining: AtomicBool::new(false),
            request_ids: AtomicU64::new(0),
            id_prefix,
        }
    }

    /// The client's `x-request-id` when it is a sane token, else a fresh unique one.
    fn request_id(&self, headers: &HeaderMap) -> String {
        if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
            if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
                return id.to_owned();
            }
        }
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:08x}", self.id_prefix)
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_PROXY_MODEL: HeaderName = HeaderName::from_static("x-proxy-model");
pub(crate) static X_PROXY_ATTEMPTS: HeaderName = HeaderName::from_static("x-proxy-attempts");
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
static IDENTITY: HeaderValue = HeaderValue::from_static("identity");

/// Handles one client request. Never fails: every error becomes a response here, in the shape of
/// the API the client called.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // The config this request started with serves it to the end, whatever reloads happen meanwhile.
    let runtime = shared.runtime.load_full();
    let request_id = shared.request_id(request.headers());
    let mut record = Box::new(RequestRecord::new(
        runtime.config.clone(),
        request_id,
        request.method().clone(),
        request.uri().path().to_owned(),
    ));
    let mut permits = Vec::new();
    let shape = Shape::of(request.method(), request.uri().path());
    let forwarded = forward(&shared, &runtime, request, shape, &mut record, &mut permits).await;
    let mut response = match forwarded {
        Ok(response) => response,
        Err(error) => {
            record.error = Some(error.kind());
            tracing::debug!(request_id = %record.request_id, error = %error.message(), "request failed");
            error.into_response(shape).map(ProxyBody::full)
        }
    };
    record.status = response.status().as_u16();
    if let Ok(id) = HeaderValue::from_str(&record.request_id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    Ok(response.map(|body| body.with_record(record).with_permits(permits)))
}

/// Takes a slot in the route's and the caller's limits, held until the answer ends. Over a limit,
/// the request is refused at once: load is shed before it reaches streams already running.
fn admit(
    shared: &Shared,
    route: &Route,
    caller: Option<&crate::auth::Token>,
    permits: &mut Vec<Permit>,
) -> Result<(), ProxyError> {
    let now = Instant::now();
    let scopes = [
        Some((
            format!("route \"{}\"", route.name),
            route.max_concurrent,
            route.requests_per_minute,
        )),
        caller.map(|t| {
            (
                format!("token \"{}\"", t.name),
                t.max_concurrent,
                t.requests_per_minute,
            )
        }),
    ];
    for (scope, concurrent, per_minute) in scopes.into_iter().flatten() {
        match shared.limits.admit(&scope, concurrent, per_minute, now) {
            Ok(permit) => permits.extend(permit),
            Err(Rejection::Concurrency { limit }) => {
                return Err(ProxyError::Overloaded { scope, limit });
            }
            Err(Rejection::Rate {
                per_minute,
                retry_after,
            }) => {
                return Err(ProxyError::RateLimited {
                    scope,
                    per_minute,
                    retry_after,
                });
            }
        }
    }
    Ok(())
}

/// The request body as the pipeline holds it.
enum InboundBody {
    /// Read whole (and decoded): JSON, or a small body of another kind.
    Whole {
        bytes: Bytes,
        json: Option<JsonBody>,
    },
    /// Streamed through as it arrives, with the model its form named.
    Upload {
        upload: Box<Upload>,
        model: Option<String>,
    },
}

impl InboundBody {
    async fn read(
        parts: &http::request::Parts,
        rest: &str,
        body: Incoming,
        limits: &BodyLimits,
    ) -> Result<InboundBody, ProxyError> {
        if streams_through(&parts.method, rest, &parts.headers) {
            let (upload, model) = Upload::start(&parts.headers, body, limits).await?;
            return Ok(InboundBody::Upload {
                upload: Box::new(upload),
                model,
            });
        }
        let bytes = crate::pipeline::intake::read_whole(&parts.headers, body, limits).await?;
        let json = parse_json(&parts.method, rest, &parts.headers, bytes.clone())?;
        Ok(InboundBody::Whole { bytes, json })
    }

    fn model(&self) -> Option<&str> {
        match self {
            InboundBody::Whole { json, .. } => json.as_ref().and_then(JsonBody::model),
            InboundBody::Upload { model, .. } => model.as_deref(),
        }
    }
}

async fn forward(
    shared: &Shared,
    runtime: &Runtime,
    request: Request<Incoming>,
    shape: Shape,
    record: &mut RequestRecord,
    permits: &mut Vec<Permit>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let rest = crate::upstream::api_path(parts.uri.path())?;
    // Unknown callers are turned away before their body is read.
    let caller = runtime.tokens.authenticate(&parts.headers)?;
    if let Some(token) = caller {
        record.caller = Some(token.name.clone());
    }
    let limits = BodyLimits::new(&runtime.config.server);
    let inbound = InboundBody::read(&parts, rest, body, &limits).await?;
    let requested_model = inbound.model().map(str::to_owned);
    record.requested_model = requested_model.clone();

    let route = runtime.router.route(&RequestFacts {
        model: requested_model.as_deref(),
        path: parts.uri.path(),
        headers: &parts.headers,
    });
    record.route = route.name.clone();
    if let Some(token) = caller {
        token.allows(&route.name, requested_model.as_deref())?;
    }
    admit(shared, route, caller, permits)?;
    let credentials = match runtime.config.upstream.auth {
        UpstreamAuth::Inject => runtime.api_key.clone().ok_or(ProxyError::NoApiKey)?,
        UpstreamAuth::Passthrough => {
            crate::auth::callers_key(&parts.headers).ok_or(ProxyError::MissingCredentials)?
        }
    };
    let mut headers = upstream_headers(&parts.headers, runtime, route, &credentials);
    if !parts.headers.contains_key(&X_REQUEST_ID) {
        if let Ok(id) = HeaderValue::from_str(&record.request_id) {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
    }
    let uri = runtime
        .base_url
        .join(rest, parts.uri.query())
        .map_err(|_| ProxyError::BadPath)?;
    let (bytes, json) = match inbound {
        InboundBody::Upload { upload, .. } => {
            let target = Target {
                shared,
                runtime,
                route,
                parts: &parts,
                uri,
                headers,
                shape,
            };
            return send_upload(target, upload, requested_model.as_deref(), record).await;
        }
        InboundBody::Whole { bytes, json } => (bytes, json),
    };
    // The body was decoded: it goes upstream as it is now.
    headers.remove(header::CONTENT_ENCODING);

    // Callers with their own upstream keys, or their own tokens, never share cached answers.
    let tenant = match (runtime.config.upstream.auth, caller) {
        (UpstreamAuth::Passthrough, _) => Some(credentials.as_bytes()),
        (UpstreamAuth::Inject, Some(token)) => Some(token.name.as_bytes()),
        (UpstreamAuth::Inject, None) => None,
    };
    let chain = route.chain();
    let cache = match (&json, route.cache_ttl) {
        (Some(json), Some(ttl)) => {
            let models: Vec<&str> = chain
                .iter()
                .map(|m| m.or(requested_model.as_deref()).unwrap_or(""))
                .collect();
            let path = uri.path_and_query().map_or(rest, |p| p.as_str());
            match lookup(shared, path, &models, tenant, json, ttl, &parts.headers).await {
                Lookup::Hit(answer) => return Ok(cached_response(&answer, record)),
                Lookup::Waited(answer) => {
                    record.coalesced = true;
                    return Ok(cached_response(&answer, record));
                }
                Lookup::Miss(miss) => Some(miss),
                Lookup::Bypass => None,
            }
        }
        _ => None,
    };
    let cache_header = match (&json, route.cache_ttl, &cache) {
        (Some(_), Some(_), Some(_)) => Some("MISS"),
        (Some(_), Some(_), None) => Some("BYPASS"),
        _ => None,
    };
    record.cache = cache_header;

    let max_attempts = runtime.config.fallback.max_attempts;
    let outbound = Outbound {
        runtime,
        route,
        method: parts.method,
        uri,
        headers,
        bytes,
        json,
        upload: Mutex::new(None),
        shape,
        inspect: chain.len() > 1 && max_attempts > 1,
    };
    let mut response = run_chain(
        shared,
        &outbound,
        &chain,
        requested_model.as_deref(),
        record,
    )
    .await?;
    if let Some(value) = cache_header {
        response
            .headers_mut()
            .insert(X_CACHE.clone(), HeaderValue::from_static(value));
    }
    if let Some(miss) = cache {
        miss.store(shared, &mut response, record.served_model.clone());
    }
    Ok(response)
}

/// Where a request goes, once routed.
struct Target<'a> {
    shared: &'a Shared,
    runtime: &'a Runtime,
    route: &'a Route,
    parts: &'a http::request::Parts,
    uri: http::Uri,
    headers: HeaderMap,
    shape: Shape,
}

/// Sends a streamed upload: one attempt on the route's first model (the body cannot be sent
/// twice), with the form's `model` field rewritten when the route names another model.
async fn send_upload(
    target: Target<'_>,
    mut upload: Box<Upload>,
    requested: Option<&str>,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let chain = target.route.chain();
    let first = &chain[..1.min(chain.len())];
    if let (Some(Some(to)), Some(from), Some(boundary)) = (
        first.first(),
        requested,
        crate::pipeline::intake::form_boundary(&target.parts.headers),
    ) {
        if !upload.rewrite_model(&boundary, from, to) {
            tracing::debug!(request_id = %record.request_id, "the form's model field was not found in its leading bytes; sent as it is");
        }
    }
    let fault = upload.fault();
    let outbound = Outbound {
        runtime: target.runtime,
        route: target.route,
        method: target.parts.method.clone(),
        uri: target.uri,
        headers: target.headers,
        bytes: Bytes::new(),
        json: None,
        upload: Mutex::new(Some(upload)),
        shape: target.shape,
        inspect: false,
    };
    let answer = run_chain(target.shared, &outbound, first, requested, record).await;
    // An upload that broke on the client's side (too large, too slow, gone) is the client's
    // error, not the upstream's.
    answer.map_err(|error| fault.take().unwrap_or(error))
}

/// Bodies that are not JSON and not needed for routing (multipart uploads, audio, files) are
/// streamed through; JSON, bodies of unknown type and what a model endpoint receives are read
/// whole.
fn streams_through(method: &Method, rest: &str, headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    !is_json(content_type) && !needs_model(method, rest)
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

enum Lookup {
    Hit(Arc<CachedAnswer>),
    /// Answered by an identical request in flight, after waiting for it.
    Waited(Arc<CachedAnswer>),
    Miss(Miss),
    Bypass,
}

/// A cacheable request the cache could not answer: where its answer goes once complete.
struct Miss {
    key: CacheKey,
    ttl: Duration,
    /// Set when identical requests wait for this one.
    fill: Option<FillGuard>,
}

impl Miss {
    /// Stores a complete successful answer: at once for a JSON body, at the event that completes
    /// it for a stream.
    fn store(self, shared: &Shared, response: &mut Response<ProxyBody>, model: Option<String>) {
        if response.status() != StatusCode::OK || response.body().is_failure() {
            return;
        }
        if let Some(bytes) = response.body().complete_bytes() {
            let answer = CachedAnswer::new(response.headers(), bytes.clone(), model, self.ttl);
            match self.fill {
                Some(fill) => fill.complete(answer),
                None => shared.cache.insert(self.key, answer),
            }
            return;
        }
        let recorder = StreamRecorder::new(
            shared.cache.clone(),
            self.key,
            response.headers().clone(),
            model,
            self.ttl,
        );
        response.body_mut().record_stream(recorder);
    }
}

/// Looks the request up, honouring the client's `Cache-Control`. Identical non-streaming misses
/// in flight are coalesced: one goes upstream, the others wait for its answer. Streams are not
/// coalesced (a waiter's first token would wait for the leader's last), so identical concurrent
/// streams each go upstream, and the first to complete is stored.
async fn lookup(
    shared: &Shared,
    path: &str,
    models: &[&str],
    tenant: Option<&[u8]>,
    json: &JsonBody,
    ttl: Duration,
    headers: &HeaderMap,
) -> Lookup {
    let directive = crate::cache::directive(headers);
    let key = match CacheKey::new(path, models, tenant, &json.bytes) {
        Some(key) if directive != Directive::Bypass => key,
        _ => return Lookup::Bypass,
    };
    let mut fill = None;
    if directive == Directive::Normal {
        if let Some(answer) = shared.cache.get(&key) {
            return Lookup::Hit(answer);
        }
        if !json.stream {
            match shared.cache.join_or_fill(key) {
                Fill::Lead(guard) => fill = Some(guard),
                Fill::Wait(mut receiver) => {
                    crate::record::metrics::cache_coalesced();
                    if let Some(answer) = Fill::wait(&mut receiver).await {
                        return Lookup::Waited(answer);
                    }
                }
                Fill::Alone => {}
            }
        }
    }
    Lookup::Miss(Miss { key, ttl, fill })
}

fn cached_response(answer: &CachedAnswer, record: &mut RequestRecord) -> Response<ProxyBody> {
    record.served_model = answer.model.clone();
    record.cache = Some("HIT");
    let mut response = Response::new(ProxyBody::full(answer.body.clone()));
    let headers = response.headers_mut();
    for (name, value) in &answer.headers {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(X_CACHE.clone(), HeaderValue::from_static("HIT"));
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
    headers.insert(X_PROXY_ATTEMPTS.clone(), HeaderValue::from(0));
    response
}

/// Endpoints whose body must be JSON naming a model.
fn needs_model(method: &Method, rest: &str) -> bool {
    const ENDPOINTS: [&str; 4] = [
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/messages",
    ];
    method == Method::POST && ENDPOINTS.contains(&rest)
}

/// Parses JSON bodies (required for the model endpoints, and whenever the client says JSON).
/// Other bodies (multipart uploads, empty GETs) pass through as bytes.
fn parse_json(
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
    bytes: Bytes,
) -> Result<Option<JsonBody>, ProxyError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let says_json = content_type.is_some_and(is_json);
    let required = needs_model(method, rest);
    if required {
        if let Some(ct) = content_type.filter(|_| !says_json) {
            return Err(ProxyError::UnsupportedContentType(
                ct.chars().take(100).collect(),
            ));
        }
    } else if !says_json || bytes.is_empty() {
        return Ok(None);
    }
    let json = JsonBody::parse(bytes).map_err(|error| match error {
        BodyError::Invalid(reason) => ProxyError::InvalidJson(reason),
        BodyError::ModelNotString => ProxyError::ModelNotString,
    })?;
    if required && json.model.is_none() {
        return Err(ProxyError::MissingModel);
    }
    Ok(Some(json))
}

/// The client's headers as the upstream should see them: hop-by-hop, `Host`, length and every
/// credential header dropped, identity encoding asked for; the global headers and the route's
/// own edits applied; `Authorization` set to `credentials` (the proxy's key, or the client's own
/// in pass-through mode).
fn upstream_headers(
    client: &HeaderMap,
    runtime: &Runtime,
    route: &Route,
    credentials: &HeaderValue,
) -> HeaderMap {
    let mut headers = client.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    crate::auth::remove_credentials(&mut headers);
    // Compressed answers could not be scanned for usage and errors on the way through, and on the
    // short hop compression buys nothing; without the header a server may compress anyway.
    headers.insert(header::ACCEPT_ENCODING, IDENTITY.clone());
    // The body was read whole already; the client's 100-continue handshake is over.
    headers.remove(header::EXPECT);
    for name in &route.remove_headers {
        headers.remove(name);
    }
    for (name, value) in runtime.upstream_headers.iter().chain(&route.set_headers) {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(header::AUTHORIZATION, credentials.clone());
    headers
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
