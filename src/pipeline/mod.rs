//! The request pipeline, one request as phases over a [`RequestContext`]: inbound (the path, the
//! caller, the body read once: `inbound`, `intake`) -> plan (the route and its attempts, access
//! and limits) -> cache (`lookup`) -> attempts (`attempts`) -> relay (`relay`) -> record
//! (`crate::record`). [`handle`] runs them for a client's request; [`execute`] runs plan -> cache ->
//! attempts for a request the proxy makes itself (a batch line).

mod admission;
pub mod attempts;
pub mod body;
mod context;
pub mod headers;
pub mod inbound;
pub mod intake;
pub mod line;
mod lookup;
pub mod relay;
mod trace;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::cache::ResponseCache;
use crate::config::UpstreamAuth;
use crate::error::ProxyError;
use crate::health::Health;
use crate::limits::Limits;
use crate::record::CacheResult;
use crate::redis::{Budgets, SharedLimiter};
use crate::runtime::router::{Attempt, Plan};
use crate::runtime::Runtime;
use crate::telemetry::Telemetry;
use attempts::{run_chain, Outbound};
pub use context::RequestContext;
use headers::X_CACHE;
use inbound::{Caller, Inbound, InboundBody};
use intake::Upload;
use lookup::{Lookup, Query};
use relay::ProxyBody;
use trace::TraceHead;

/// State shared by every request: the live runtime (swapped whole on reload), model health
/// (which outlives reloads) and the drain flag.
pub struct Shared {
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub health: Health,
    pub limits: Limits,
    /// Request rates, across replicas with Redis (its per-replica fallback outlives reloads).
    pub limiter: SharedLimiter,
    /// Spend per route and token.
    pub budgets: Arc<Budgets>,
    /// Traces (set at start-up from `[otel]`).
    pub telemetry: Telemetry,
    /// Sized at start-up from `[cache]`; entries outlive reloads.
    pub cache: Arc<ResponseCache>,
    pub draining: AtomicBool,
    request_ids: AtomicU64,
    id_prefix: u64,
}

impl Shared {
    /// The shared state for a first runtime; fails only on tracing settings that cannot work (an
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` that is no URL).
    pub fn new(runtime: Runtime) -> Result<Shared, String> {
        let telemetry = Telemetry::new(&runtime.config.otel)?;
        Ok(Shared::with_telemetry(runtime, telemetry))
    }

    /// The shared state with the tracing given (tests pass one that ignores the environment).
    pub fn with_telemetry(runtime: Runtime, telemetry: Telemetry) -> Shared {
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
            limiter: SharedLimiter::default(),
            budgets: Arc::default(),
            telemetry,
            cache,
            draining: AtomicBool::new(false),
            request_ids: AtomicU64::new(0),
            id_prefix,
        }
    }

    /// The client's `x-request-id` when it is a sane token, else a fresh unique one; with the
    /// header value that carries it (the client's own, or one made once and shared by clones).
    fn request_id(&self, headers: &HeaderMap) -> (String, HeaderValue) {
        if let Some(value) = headers.get(&headers::X_REQUEST_ID) {
            if let Ok(id) = value.to_str() {
                if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
                    return (id.to_owned(), value.clone());
                }
            }
        }
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        headers::generated_id(self.id_prefix, n)
    }
}

/// Handles one client request. Never fails: every error becomes a response, in the shape of the
/// API the client called.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let method = request.method().clone();
    let mut ctx = RequestContext::new(&shared, &method, request.uri().path(), request.headers());
    let head = shared.telemetry.is_enabled().then(|| {
        let (uri, version) = (request.uri(), request.version());
        TraceHead::of(&method, uri, version, request.headers())
    });
    let read = Inbound::read(&ctx.runtime, request).await;
    if let Some(head) = &head {
        trace::start(&mut ctx, &shared.telemetry, head, read.as_ref().ok());
    }
    let outcome = match read {
        Ok(inbound) => answer(&shared, &mut ctx, inbound).await,
        Err(error) => Err(error),
    };
    Ok(ctx.respond(outcome))
}

/// A request the proxy makes itself (a batch line), as if a client had sent it.
pub struct InternalRequest {
    pub method: Method,
    /// The full path, e.g. `/v1/chat/completions`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The inbound token it runs as (its routes, models and limits apply), when tokens are
    /// configured; otherwise the caller is read from `headers` like a client's.
    pub token: Option<String>,
}

/// Runs plan -> cache -> attempts for a request that did not come from a connection, returning
/// the answer the HTTP path would send for it.
pub async fn execute(shared: &Shared, request: InternalRequest) -> Response<ProxyBody> {
    execute_in_batch(shared, request, None).await
}

/// [`execute`] for a line of the batch `batch_id`, which its access-log line names.
pub async fn execute_in_batch(
    shared: &Shared,
    request: InternalRequest,
    batch_id: Option<String>,
) -> Response<ProxyBody> {
    let mut ctx = RequestContext::new(shared, &request.method, &request.path, &request.headers);
    ctx.record.batch_id = batch_id;
    let head = shared.telemetry.is_enabled().then(|| {
        let uri = request.path.parse().unwrap_or_default();
        TraceHead::of(
            &request.method,
            &uri,
            http::Version::HTTP_11,
            &request.headers,
        )
    });
    let read = internal_inbound(&ctx.runtime, request);
    if let Some(head) = &head {
        trace::start(&mut ctx, &shared.telemetry, head, read.as_ref().ok());
    }
    let outcome = match read {
        Ok(inbound) => answer(shared, &mut ctx, inbound).await,
        Err(error) => Err(error),
    };
    ctx.respond(outcome)
}

fn internal_inbound(runtime: &Runtime, request: InternalRequest) -> Result<Inbound, ProxyError> {
    let rest = crate::upstream::api_path(&request.path)?.to_owned();
    let caller = match &request.token {
        Some(name) => Caller {
            token: Some(runtime.tokens.named(name).ok_or(ProxyError::Unauthorized)?),
            key: None,
        },
        None => Caller::of(runtime, &request.headers)?,
    };
    let body = InboundBody::whole(&request.method, &rest, &request.headers, request.body)?;
    let (path, query) = match request.path.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (request.path, None),
    };
    Ok(Inbound {
        method: request.method,
        path,
        query,
        headers: request.headers,
        caller,
        body,
    })
}

/// Plan -> cache -> attempts.
async fn answer(
    shared: &Shared,
    ctx: &mut RequestContext,
    inbound: Inbound,
) -> Result<Response<ProxyBody>, ProxyError> {
    let runtime = ctx.runtime.clone();
    let record = &mut ctx.record;
    record.caller = inbound.caller.token.as_ref().map(|t| t.name.clone());
    record.requested_model = inbound.model().map(str::to_owned);
    let plan = runtime.plan(&inbound.facts());
    record.route = plan.route.name.clone();
    let token = inbound.caller.token.as_deref();
    if let Some(token) = token {
        token.allows(&plan.route.name, inbound.model())?;
    }
    let redis = runtime.redis.as_ref();
    admission::admit(shared, redis, plan.route, token, &mut ctx.permits).await?;
    let attempts = reachable(&runtime, &plan, &inbound.caller)?;
    let requested = inbound.model().map(str::to_owned);
    let tenant = inbound.tenant(&runtime).map(<[u8]>::to_vec);
    let query = inbound.query.clone();
    let mut out = Outbound {
        runtime: &runtime,
        route: plan.route,
        attempts: &attempts,
        method: inbound.method,
        rest: inbound.path.strip_prefix("/v1").unwrap_or(&inbound.path),
        query: query.as_deref(),
        headers: headers::for_upstream(&inbound.headers, plan.route),
        callers_key: inbound.caller.key,
        bytes: Bytes::new(),
        json: None,
        upload: Mutex::new(None),
        streamed: false,
        shape: ctx.shape,
        inspect: false,
    };
    let record = &mut ctx.record;
    // The upstream sees the same request id as the client and the access log.
    if !out.headers.contains_key(&headers::X_REQUEST_ID) {
        out.headers
            .insert(headers::X_REQUEST_ID.clone(), ctx.request_id.clone());
    }
    match inbound.body {
        InboundBody::Upload { upload, .. } => {
            let token = inbound.caller.token.as_deref();
            admission::check_budgets(shared, redis, plan.route, token, record).await?;
            send_upload(shared, &mut out, upload, requested.as_deref(), record).await
        }
        InboundBody::Whole { bytes, json } => {
            // The body was decoded: it goes upstream as it is now.
            out.headers.remove(header::CONTENT_ENCODING);
            out.bytes = bytes;
            out.json = json;
            let max_attempts = runtime.config.fallback.max_attempts;
            out.inspect = attempts.len() > 1 && max_attempts > 1;
            let cached = Cached {
                tenant: tenant.as_deref(),
                headers: &inbound.headers,
                token: inbound.caller.token.as_deref(),
            };
            send_whole(shared, &out, cached, requested.as_deref(), record).await
        }
    }
}

/// The plan's attempts that have credentials to send; an error when none has.
fn reachable<'a>(
    runtime: &'a Runtime,
    plan: &Plan<'a>,
    caller: &Caller,
) -> Result<Vec<Attempt<'a>>, ProxyError> {
    let attempts: Vec<Attempt<'a>> = plan
        .attempts
        .iter()
        .filter(|a| {
            runtime
                .upstreams
                .at(a.upstream)
                .reachable(caller.key.as_ref())
        })
        .copied()
        .collect();
    if !attempts.is_empty() {
        return Ok(attempts);
    }
    let first = plan
        .attempts
        .first()
        .map(|a| runtime.upstreams.at(a.upstream));
    Err(match first.map(|u| u.auth) {
        Some(UpstreamAuth::Passthrough) => ProxyError::MissingCredentials,
        _ => ProxyError::NoApiKey,
    })
}

/// What the cache and budget phases need from the client's request.
struct Cached<'a> {
    tenant: Option<&'a [u8]>,
    headers: &'a HeaderMap,
    token: Option<&'a crate::auth::Token>,
}

/// A body read whole: answered from the cache where the route caches, else by the attempts; a
/// cacheable answer is stored once complete.
async fn send_whole(
    shared: &Shared,
    out: &Outbound<'_>,
    cached: Cached<'_>,
    requested: Option<&str>,
    record: &mut crate::record::RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut miss = None;
    if let (Some(json), Some(ttl)) = (&out.json, out.route.cache_ttl) {
        let attempts: Vec<String> = out
            .attempts
            .iter()
            .map(|a| {
                let upstream = &out.runtime.upstreams.at(a.upstream).name;
                format!("{upstream}/{}", a.model.or(requested).unwrap_or(""))
            })
            .collect();
        let path = match out.query {
            Some(query) => format!("{}?{query}", out.rest),
            None => out.rest.to_owned(),
        };
        let patched = out
            .route
            .body_policy
            .as_ref()
            .and_then(|p| p.apply(&json.bytes));
        let query = Query {
            tiers: &out.runtime.cache_tiers,
            path: &path,
            attempts: &attempts,
            tenant: cached.tenant,
            ttl,
            body: patched.as_deref().unwrap_or(&json.bytes),
        };
        match lookup::lookup(shared, query, json, cached.headers, record).await {
            Lookup::Hit(answer, tier) => return Ok(lookup::cached_response(&answer, tier, record)),
            Lookup::Waited(answer, tier) => {
                record.coalesced = true;
                return Ok(lookup::cached_response(&answer, tier, record));
            }
            Lookup::Miss(found) => {
                record.cache = Some(CacheResult::Miss);
                miss = Some(found);
            }
            Lookup::Bypass => record.cache = Some(CacheResult::Bypass),
        }
    }
    let redis = out.runtime.redis.as_ref();
    admission::check_budgets(shared, redis, out.route, cached.token, record).await?;
    let mut response = run_chain(shared, out, requested, record).await?;
    if let Some(result) = record.cache {
        let value = HeaderValue::from_static(result.header());
        response.headers_mut().insert(X_CACHE.clone(), value);
    }
    if let Some(miss) = miss {
        miss.store(shared, &mut response, record.served_model.clone());
    }
    Ok(response)
}

/// Sends a streamed upload: one attempt, the plan's first (the body cannot be sent twice), with
/// the form's `model` field rewritten when the route names another model.
async fn send_upload(
    shared: &Shared,
    out: &mut Outbound<'_>,
    mut upload: Box<Upload>,
    requested: Option<&str>,
    record: &mut crate::record::RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    out.attempts = &out.attempts[..1.min(out.attempts.len())];
    let to = out.attempts.first().and_then(|a| a.model);
    let boundary = intake::form_boundary(&out.headers);
    if let (Some(to), Some(from), Some(boundary)) = (to, requested, boundary) {
        if !upload.rewrite_model(&boundary, from, to) {
            tracing::debug!(request_id = %record.request_id, "the form's model field was not found in its leading bytes; sent as it is");
        }
    }
    let fault = upload.fault();
    out.upload = Mutex::new(Some(upload));
    out.streamed = true;
    let answer = run_chain(shared, out, requested, record).await;
    // An upload that broke on the client's side (too large, too slow, gone) is the client's
    // error, not the upstream's.
    answer.map_err(|error| fault.take().unwrap_or(error))
}
