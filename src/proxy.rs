//! The request pipeline: check the path, read the body once, route, send the attempts (falling
//! back while nothing has reached the client), and hand the upstream answer back unbuffered.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::body::{BodyError, JsonBody};
use crate::cache::{
    CacheKey, CachedAnswer, Directive, Fill, FillGuard, ResponseCache, StreamRecorder,
};
use crate::config::{Midstream, UpstreamAuth};
use crate::error::{AttemptNote, ProxyError};
use crate::health::{Health, Policy};
use crate::limits::{Limits, Permit, Rejection};
use crate::relay::{ProxyBody, Relay, RequestRecord, Resume, ResumeFuture};
use crate::reload::Runtime;
use crate::router::{RequestFacts, Route};
use crate::sse::{Event, Scanner};
use crate::upstream::UpstreamClient;

/// State shared by every request: the live runtime (swapped whole on reload), model health
/// (which outlives reloads) and the drain flag.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
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
            runtime: ArcSwap::from_pointee(runtime),
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
static X_PROXY_MODEL: HeaderName = HeaderName::from_static("x-proxy-model");
static X_PROXY_ATTEMPTS: HeaderName = HeaderName::from_static("x-proxy-attempts");
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Handles one client request. Never fails: every error becomes an OpenAI-shaped response here.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // The config this request started with serves it to the end, whatever reloads happen meanwhile.
    let runtime = shared.runtime.load_full();
    let request_id = shared.request_id(request.headers());
    let mut record = Box::new(RequestRecord::new(
        runtime.clone(),
        request_id,
        request.method().clone(),
        request.uri().path().to_owned(),
    ));
    let mut permits = Vec::new();
    let mut response = match forward(&shared, &runtime, request, &mut record, &mut permits).await {
        Ok(response) => response,
        Err(error) => {
            record.error = Some(error.kind());
            tracing::debug!(request_id = %record.request_id, error = %error.message(), "request failed");
            error.into_response()
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

/// What every attempt of one request shares.
struct Outbound<'a> {
    runtime: &'a Runtime,
    route: &'a Route,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The raw body, sent as it is when the model is not rewritten.
    bytes: Bytes,
    json: Option<JsonBody>,
    /// More than one model may answer: failures are inspected and fall back.
    inspect: bool,
}

impl Outbound<'_> {
    fn body_for(&self, model: Option<&str>) -> Bytes {
        match (model, &self.json) {
            (Some(model), Some(json)) => json.with_model(model),
            _ => self.bytes.clone(),
        }
    }

    fn request(&self, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

async fn forward(
    shared: &Shared,
    runtime: &Runtime,
    request: Request<Incoming>,
    record: &mut RequestRecord,
    permits: &mut Vec<Permit>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let rest = api_path(parts.uri.path())?;
    // Unknown callers are turned away before their body is read.
    let caller = runtime.tokens.authenticate(&parts.headers)?;
    if let Some(token) = caller {
        record.caller = Some(token.name.clone());
    }
    let bytes = read_body(&parts.headers, body, runtime.config.server.max_body_bytes).await?;
    let json = parse_json(&parts.method, rest, &parts.headers, bytes.clone())?;
    let requested_model = json.as_ref().and_then(JsonBody::model).map(str::to_owned);
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
        UpstreamAuth::Inject => runtime.api_key.as_ref().ok_or(ProxyError::NoApiKey)?,
        UpstreamAuth::Passthrough => parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(ProxyError::MissingCredentials)?,
    };
    let mut headers = upstream_headers(&parts.headers, runtime, route, credentials);
    if !parts.headers.contains_key(&X_REQUEST_ID) {
        if let Ok(id) = HeaderValue::from_str(&record.request_id) {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
    }
    let uri = runtime
        .base_url
        .join(rest, parts.uri.query())
        .map_err(|_| ProxyError::BadPath)?;

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
    /// Stores a complete successful answer: at once for a JSON body, at its `[DONE]` for a stream.
    fn store(self, shared: &Shared, response: &mut Response<ProxyBody>, model: Option<String>) {
        if response.status() != StatusCode::OK {
            return;
        }
        if let Some(bytes) = response.body().complete_bytes() {
            if crate::sse::json_body_error(bytes).is_some() {
                return;
            }
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
                    crate::metrics::cache_coalesced();
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

/// Tries the models of the chain in order until one answers.
async fn run_chain(
    shared: &Shared,
    outbound: &Outbound<'_>,
    chain: &[Option<&str>],
    requested_model: Option<&str>,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let runtime = outbound.runtime;
    let max_attempts = runtime.config.fallback.max_attempts;
    let policy = Policy {
        failures: runtime.config.fallback.cooldown_failures,
        cooldown: runtime.config.fallback.cooldown,
    };
    let mut notes: Vec<AttemptNote> = Vec::new();
    let mut last_failure: Option<Failure> = None;
    let mut retried_same_model = false;
    let mut index = 0;
    let mut tried = 0;
    while index < chain.len() && tried < max_attempts {
        let model = chain[index].or(requested_model);
        let label = model.unwrap_or("");
        let untried_last = tried == 0 && index + 1 == chain.len();
        if !untried_last && shared.health.should_skip(label, Instant::now(), policy) {
            // Cooling down after repeated failures; the last model is tried anyway rather than
            // failing the request without a single attempt.
            notes.push(AttemptNote::skipped(label));
            index += 1;
            if let Some(next) = chain.get(index) {
                let next = next.or(requested_model).unwrap_or("");
                crate::metrics::fallback(&runtime.config, label, next, "cooldown");
            }
            continue;
        }
        tried += 1;
        record.attempts = tried;
        let started = Instant::now();
        match attempt(outbound, chain[index], model, started, record).await {
            Ok(mut response) => {
                crate::metrics::upstream_attempt(&runtime.config, label, "answered");
                shared.health.record_success(label);
                record.served_model = model.map(str::to_owned);
                if let Some(model) = model.and_then(|m| HeaderValue::from_str(m).ok()) {
                    response.headers_mut().insert(X_PROXY_MODEL.clone(), model);
                }
                response
                    .headers_mut()
                    .insert(X_PROXY_ATTEMPTS.clone(), HeaderValue::from(tried));
                return Ok(response);
            }
            Err(failure) => {
                crate::metrics::upstream_attempt(&runtime.config, label, failure.reason.label());
                shared.health.record_failure(label, Instant::now(), policy);
                tracing::warn!(
                    request_id = %record.request_id,
                    model = label,
                    reason = %failure.describe(),
                    "upstream attempt failed"
                );
                notes.push(AttemptNote::failed(
                    label,
                    failure.describe(),
                    failure.status,
                ));
                // A short Retry-After on a 429 is worth waiting for on the same model, once.
                let wait = failure
                    .retry_after
                    .filter(|wait| *wait <= runtime.config.fallback.retry_after_max);
                if let (Some(wait), false, true) = (wait, retried_same_model, tried < max_attempts)
                {
                    retried_same_model = true;
                    tokio::time::sleep(wait).await;
                    last_failure = Some(failure);
                    continue;
                }
                retried_same_model = false;
                index += 1;
                if let Some(next) = chain.get(index).filter(|_| tried < max_attempts) {
                    let next = next.or(requested_model).unwrap_or("");
                    crate::metrics::fallback(&runtime.config, label, next, failure.reason.label());
                }
                last_failure = Some(failure);
            }
        }
    }
    Err(match (last_failure, notes.len()) {
        // A single attempt keeps its own precise error (unreachable 502, timeout 504).
        (Some(failure), 1) => failure.into_error(),
        (last, _) => ProxyError::AllAttemptsFailed {
            status: last.map_or(StatusCode::BAD_GATEWAY, |f| f.summary_status()),
            attempts: notes,
        },
    })
}

/// Why an attempt did not produce an answer for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Connect,
    Timeout,
    Status(u16),
    /// OpenRouter's "unavailable" answer with status 200: an `error` object in the JSON body, or an
    /// SSE error event before any content.
    Unavailable,
    /// The stream ended or broke before any content.
    StreamFailed,
    Transport,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Connect => "connect_error",
            Reason::Timeout => "timeout",
            Reason::Status(429) => "rate_limited",
            Reason::Status(408) => "status_408",
            Reason::Status(status) if status >= 500 => "status_5xx",
            Reason::Status(_) => "status_4xx",
            Reason::Unavailable => "unavailable",
            Reason::StreamFailed => "stream_failed",
            Reason::Transport => "upstream_error",
        }
    }
}

#[derive(Debug)]
struct Failure {
    reason: Reason,
    detail: String,
    status: Option<StatusCode>,
    retry_after: Option<Duration>,
    timeout: Duration,
}

impl Failure {
    fn new(reason: Reason, detail: String) -> Failure {
        Failure {
            reason,
            detail,
            status: None,
            retry_after: None,
            timeout: Duration::ZERO,
        }
    }

    fn describe(&self) -> String {
        match self.reason {
            Reason::Status(status) if self.detail.is_empty() => format!("status {status}"),
            Reason::Status(status) => format!("status {status}: {}", self.detail),
            _ => self.detail.clone(),
        }
    }

    /// The status of the all-attempts-failed answer when this was the last failure.
    fn summary_status(&self) -> StatusCode {
        match (self.status, self.reason) {
            (Some(status), _) if status.as_u16() >= 400 => status,
            (_, Reason::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    fn into_error(self) -> ProxyError {
        match self.reason {
            Reason::Connect => ProxyError::UpstreamConnect(self.detail),
            Reason::Timeout => ProxyError::UpstreamTimeout(self.timeout),
            _ => ProxyError::Upstream(self.describe()),
        }
    }
}

/// One upstream attempt. `Ok` is an answer the client gets (success, or an error that is the
/// client's own); `Err` is a failure another model may make up for.
async fn attempt(
    out: &Outbound<'_>,
    rewrite: Option<&str>,
    model: Option<&str>,
    started: Instant,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, Failure> {
    let timeout = out.route.first_byte_timeout;
    let request = out.request(out.body_for(rewrite));
    record.mark_dispatched();
    let response = send(&out.runtime.client, request, timeout).await?;
    let status = response.status();
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let fallback_status = status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || out.runtime.fallback_on_status(status.as_u16());
    if out.inspect && fallback_status {
        let retry_after = retry_after(&parts.headers);
        let detail = error_detail(body).await;
        return Err(Failure {
            reason: Reason::Status(status.as_u16()),
            detail,
            status: Some(status),
            retry_after,
            timeout,
        });
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let idle = out.runtime.config.upstream.stream_idle_timeout;
    if !status.is_success() {
        return Ok(Response::from_parts(
            parts,
            ProxyBody::relay(Relay::new(body, VecDeque::new(), None, idle)),
        ));
    }
    let body = if content_type.starts_with("text/event-stream") {
        let resumable = out.route.on_midstream == Midstream::Resume && out.json.is_some();
        let mut scanner = Scanner::new(resumable);
        let (held, body) = if out.inspect {
            hold_until_content(body, &mut scanner, started + timeout, timeout).await?
        } else {
            (VecDeque::new(), body)
        };
        // Only chat and text completions promise a closing `[DONE]`.
        let expect_done = out.json.as_ref().is_some_and(|j| j.stream);
        let mut relay = Relay::new(body, held, Some(scanner), idle).expect_done(expect_done);
        if resumable {
            if let Some(continuation) = Continuation::new(out, model) {
                relay = relay.with_resume(Box::new(continuation));
            }
        }
        ProxyBody::relay(relay)
    } else if content_type.starts_with("application/json") {
        let limit = out.runtime.config.fallback.max_inspect_bytes;
        match read_bounded(body, limit, started + timeout, timeout).await? {
            Bounded::Complete(bytes) => {
                if out.inspect {
                    if let Some(message) = crate::sse::json_body_error(&bytes) {
                        return Err(Failure::new(Reason::Unavailable, message));
                    }
                }
                record.usage = crate::sse::json_body_usage(&bytes);
                parts.headers.remove(header::CONTENT_LENGTH);
                ProxyBody::full(bytes)
            }
            Bounded::TooLarge(held, body) => ProxyBody::relay(Relay::new(body, held, None, idle)),
        }
    } else {
        ProxyBody::relay(Relay::new(body, VecDeque::new(), None, idle))
    };
    Ok(Response::from_parts(parts, body))
}

/// Reads a streaming answer until its first content event, holding back what came before
/// (status, headers, keep-alive comments), so that an error event in its place can still fall
/// back invisibly. The moment content shows up, everything held goes out.
async fn hold_until_content(
    mut body: Incoming,
    scanner: &mut Scanner,
    deadline: Instant,
    timeout: Duration,
) -> Result<(VecDeque<Bytes>, Incoming), Failure> {
    let mut held = VecDeque::new();
    loop {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame()).await;
        let frame = match frame {
            Err(_) => {
                let mut failure = Failure::new(
                    Reason::Timeout,
                    format!("no content within {}", humantime::format_duration(timeout)),
                );
                failure.timeout = timeout;
                return Err(failure);
            }
            Ok(None) if scanner.done => return Ok((held, body)),
            Ok(None) => {
                return Err(Failure::new(
                    Reason::StreamFailed,
                    "the stream ended before any content".into(),
                ));
            }
            Ok(Some(Err(error))) => {
                return Err(Failure::new(
                    Reason::StreamFailed,
                    format!("the stream broke before any content: {error}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let mut verdict: Option<Result<(), String>> = None;
        scanner.feed(&data, |event| {
            if verdict.is_none() {
                match event {
                    Event::Error(message) => verdict = Some(Err(message)),
                    Event::Content | Event::Done => verdict = Some(Ok(())),
                    Event::KeepAlive => {}
                }
            }
        });
        held.push_back(data);
        match verdict {
            Some(Err(message)) => return Err(Failure::new(Reason::Unavailable, message)),
            Some(Ok(())) => return Ok((held, body)),
            None => {}
        }
    }
}

enum Bounded {
    Complete(Bytes),
    /// Over the inspection limit: what was read so far, and the rest still to come.
    TooLarge(VecDeque<Bytes>, Incoming),
}

/// Reads a non-streaming answer whole when it fits in `limit`.
async fn read_bounded(
    mut body: Incoming,
    limit: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Bounded, Failure> {
    let mut held: VecDeque<Bytes> = VecDeque::new();
    let mut size = 0;
    loop {
        // The whole answer must arrive within the first-byte budget plus the idle allowance of a
        // stream; a stalled body is a failed attempt while nothing has reached the client.
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Ok(frame) => frame,
            Err(_) => match tokio::time::timeout(timeout, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    let mut failure = Failure::new(Reason::Timeout, "the answer stalled".into());
                    failure.timeout = timeout;
                    return Err(failure);
                }
            },
        };
        match frame {
            None => break,
            Some(Err(error)) => {
                return Err(Failure::new(
                    Reason::Transport,
                    format!("the answer broke off: {error}"),
                ));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    held.push_back(data);
                    if size > limit {
                        return Ok(Bounded::TooLarge(held, body));
                    }
                }
            }
        }
    }
    Ok(Bounded::Complete(match held.len() {
        0 => Bytes::new(),
        1 => held.pop_front().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(size);
            for part in held {
                joined.extend_from_slice(&part);
            }
            joined.freeze()
        }
    }))
}

/// The start of a failed answer's error message, for the attempt summary: bounded in size and
/// time, since nothing of it reaches the client.
async fn error_detail(body: Incoming) -> String {
    let read = Limited::new(body, 16 * 1024).collect();
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(collected)) => {
            let bytes = collected.to_bytes();
            crate::sse::json_body_error(&bytes).unwrap_or_else(|| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                    .trim()
                    .to_owned()
            })
        }
        _ => String::new(),
    }
}

/// `Retry-After` in seconds (the form OpenRouter and most APIs use).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// One upstream attempt up to the response head, bounded by the first-byte timeout.
async fn send(
    client: &UpstreamClient,
    request: Request<Full<Bytes>>,
    first_byte_timeout: Duration,
) -> Result<Response<Incoming>, Failure> {
    match tokio::time::timeout(first_byte_timeout, client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) if error.is_connect() => {
            Err(Failure::new(Reason::Connect, error_chain(&error)))
        }
        Ok(Err(error)) => Err(Failure::new(Reason::Transport, error_chain(&error))),
        Err(_) => {
            let mut failure = Failure::new(
                Reason::Timeout,
                format!(
                    "no response within {}",
                    humantime::format_duration(first_byte_timeout)
                ),
            );
            failure.timeout = first_byte_timeout;
            Err(failure)
        }
    }
}

/// Continues a stream that broke after content reached the client, on the next models of the
/// chain, with the original messages plus the partial answer as an assistant prefix.
struct Continuation {
    client: UpstreamClient,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: serde_json::Map<String, serde_json::Value>,
    models: Arc<Mutex<VecDeque<String>>>,
    timeout: Duration,
}

impl Continuation {
    fn new(out: &Outbound<'_>, serving: Option<&str>) -> Option<Continuation> {
        let json = out.json.as_ref()?;
        let body: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&json.bytes).ok()?;
        body.get("messages")?.as_array()?;
        let chain = out.route.chain();
        let position = chain.iter().position(|m| *m == serving)?;
        let models: VecDeque<String> = chain[position + 1..]
            .iter()
            .flatten()
            .map(|m| (*m).to_owned())
            .collect();
        Some(Continuation {
            client: out.runtime.client.clone(),
            method: out.method.clone(),
            uri: out.uri.clone(),
            headers: out.headers.clone(),
            body,
            models: Arc::new(Mutex::new(models)),
            timeout: out.route.first_byte_timeout,
        })
    }
}

impl Resume for Continuation {
    fn resume(&mut self, partial: &str) -> Option<ResumeFuture> {
        if self.models.lock().ok()?.is_empty() {
            return None;
        }
        let mut body = self.body.clone();
        if let Some(serde_json::Value::Array(messages)) = body.get_mut("messages") {
            messages.push(serde_json::json!({"role": "assistant", "content": partial}));
        }
        let (client, method, uri, headers) = (
            self.client.clone(),
            self.method.clone(),
            self.uri.clone(),
            self.headers.clone(),
        );
        let models = self.models.clone();
        let timeout = self.timeout;
        Some(Box::pin(async move {
            loop {
                let model = models.lock().ok()?.pop_front()?;
                body.insert("model".to_owned(), serde_json::Value::String(model.clone()));
                let bytes = Bytes::from(serde_json::to_vec(&body).ok()?);
                let mut request = Request::new(Full::new(bytes));
                *request.method_mut() = method.clone();
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = headers.clone();
                match send(&client, request, timeout).await {
                    Ok(response) if response.status().is_success() => {
                        tracing::info!(model = %model, "stream resumed");
                        return Some((response.into_body(), model));
                    }
                    Ok(response) => {
                        tracing::warn!(model = %model, status = response.status().as_u16(), "resume attempt failed");
                    }
                    Err(failure) => {
                        tracing::warn!(model = %model, reason = %failure.describe(), "resume attempt failed");
                    }
                }
            }
        }))
    }
}

/// `/v1/chat/completions` -> `/chat/completions`; anything outside `/v1` is unknown here.
fn api_path(path: &str) -> Result<&str, ProxyError> {
    let rest = match path.strip_prefix("/v1") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => return Err(ProxyError::UnknownPath),
    };
    if crate::upstream::check_path(rest) {
        Ok(rest)
    } else {
        Err(ProxyError::BadPath)
    }
}

/// Reads the whole request body (fallback must be able to replay it), refusing at once when the
/// declared length is over the limit and stopping as soon as the received bytes pass it.
async fn read_body(headers: &HeaderMap, body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(error) => Err(ProxyError::ClientBody(error.to_string())),
    }
}

/// Endpoints whose body must be JSON naming a model.
fn needs_model(method: &Method, rest: &str) -> bool {
    method == Method::POST && matches!(rest, "/chat/completions" | "/completions" | "/embeddings")
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
    let says_json = content_type.is_some_and(|ct| {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json" || essence.ends_with("+json")
    });
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

/// The client's headers as the upstream should see them: hop-by-hop, `Host`, length and encoding
/// negotiation dropped; the global headers and the route's own edits applied; `Authorization` set
/// to `credentials` (the proxy's key, or the client's own in pass-through mode).
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
    headers.remove(header::AUTHORIZATION);
    // Compressed answers could not be scanned for usage and errors on the way through; on the
    // proxy's short hop compression buys nothing.
    headers.remove(header::ACCEPT_ENCODING);
    for name in &route.remove_headers {
        headers.remove(name);
    }
    for (name, value) in runtime.upstream_headers.iter().chain(&route.set_headers) {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(header::AUTHORIZATION, credentials.clone());
    headers
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// An error with its causes, e.g. "client error (Connect): tcp connect error: Connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths() {
        assert_eq!(
            api_path("/v1/chat/completions").unwrap(),
            "/chat/completions"
        );
        assert_eq!(api_path("/v1").unwrap(), "");
        assert!(matches!(api_path("/v2/x"), Err(ProxyError::UnknownPath)));
        assert!(matches!(api_path("/v1x"), Err(ProxyError::UnknownPath)));
        assert!(matches!(api_path("/v1/../admin"), Err(ProxyError::BadPath)));
    }

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
