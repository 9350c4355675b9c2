//! The request pipeline: check the path, read the body once, route, send the attempts (falling
//! back while nothing has reached the client), and hand the upstream answer back unbuffered.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::body::{BodyError, JsonBody};
use crate::error::ProxyError;
use crate::relay::{ProxyBody, RequestRecord};
use crate::reload::Runtime;
use crate::router::{RequestFacts, Route};

/// State shared by every request: the live runtime (swapped whole on reload) and the drain flag.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub draining: AtomicBool,
    request_ids: AtomicU64,
    id_prefix: u64,
}

impl Shared {
    pub fn new(runtime: Runtime) -> Shared {
        let id_prefix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Shared {
            runtime: ArcSwap::from_pointee(runtime),
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

/// Handles one client request. Never fails: every error becomes an OpenAI-shaped response here.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // The config this request started with serves it to the end, whatever reloads happen meanwhile.
    let runtime = shared.runtime.load_full();
    let request_id = shared.request_id(request.headers());
    let mut record = Box::new(RequestRecord::new(
        request_id,
        request.method().clone(),
        request.uri().path().to_owned(),
    ));
    let mut response = match forward(&runtime, request, &mut record).await {
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
    Ok(response.map(|body| body.with_record(record)))
}

async fn forward(
    runtime: &Runtime,
    request: Request<Incoming>,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let rest = api_path(parts.uri.path())?;
    let bytes = read_body(&parts.headers, body, runtime.config.server.max_body_bytes).await?;
    let json = parse_json(&parts.method, rest, &parts.headers, bytes.clone())?;
    let requested_model = json.as_ref().and_then(JsonBody::model);
    record.requested_model = requested_model.map(str::to_owned);

    let route = runtime.router.route(&RequestFacts {
        model: requested_model,
        path: parts.uri.path(),
        headers: &parts.headers,
    });
    record.route = route.name.clone();
    let api_key = runtime.api_key.as_ref().ok_or(ProxyError::NoApiKey)?;
    let mut headers = upstream_headers(&parts.headers, runtime, route, api_key);
    if !parts.headers.contains_key(&X_REQUEST_ID) {
        if let Ok(id) = HeaderValue::from_str(&record.request_id) {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
    }
    let uri = runtime
        .base_url
        .join(rest, parts.uri.query())
        .map_err(|_| ProxyError::BadPath)?;

    let chain = route.chain();
    let max_attempts = runtime.config.fallback.max_attempts.min(chain.len());
    let mut last_error = None;
    for (index, model) in chain.iter().take(max_attempts).enumerate() {
        let is_last = index + 1 == max_attempts;
        let served_model = model.or(requested_model);
        let body = match (model, &json) {
            (Some(model), Some(json)) => json.with_model(model),
            _ => bytes.clone(),
        };
        record.attempts = index + 1;
        let mut upstream_request = Request::new(Full::new(body));
        *upstream_request.method_mut() = parts.method.clone();
        *upstream_request.uri_mut() = uri.clone();
        *upstream_request.headers_mut() = headers.clone();

        let outcome = send(&runtime.client, upstream_request, route.first_byte_timeout).await;
        let model_label = served_model.unwrap_or("");
        match outcome {
            Ok(response) if !is_last && runtime.fallback_on_status(response.status().as_u16()) => {
                crate::metrics::upstream_attempt(model_label, "fallback_status");
                tracing::warn!(
                    request_id = %record.request_id,
                    model = model_label,
                    status = response.status().as_u16(),
                    "upstream failed, falling back"
                );
            }
            Ok(response) => {
                crate::metrics::upstream_attempt(model_label, "answered");
                record.served_model = served_model.map(str::to_owned);
                return Ok(relay(response, served_model, index + 1));
            }
            Err(error) => {
                crate::metrics::upstream_attempt(model_label, error.kind());
                tracing::warn!(
                    request_id = %record.request_id,
                    model = model_label,
                    error = %error.message(),
                    "upstream attempt failed"
                );
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ProxyError::Upstream("no attempt was made".into())))
}

/// One upstream attempt, bounded by the time allowed until the response head arrives.
async fn send(
    client: &crate::upstream::UpstreamClient,
    request: Request<Full<Bytes>>,
    first_byte_timeout: Duration,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(first_byte_timeout, client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) if error.is_connect() => {
            Err(ProxyError::UpstreamConnect(error_chain(&error)))
        }
        Ok(Err(error)) => Err(ProxyError::Upstream(error_chain(&error))),
        Err(_) => Err(ProxyError::UpstreamTimeout(first_byte_timeout)),
    }
}

/// The upstream answer as the client receives it: same status, headers minus hop-by-hop ones,
/// the body relayed frame by frame.
fn relay(
    response: Response<Incoming>,
    served_model: Option<&str>,
    attempts: usize,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let event_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if let Some(model) = served_model.and_then(|m| HeaderValue::from_str(m).ok()) {
        parts.headers.insert(X_PROXY_MODEL.clone(), model);
    }
    parts
        .headers
        .insert(X_PROXY_ATTEMPTS.clone(), HeaderValue::from(attempts));
    Response::from_parts(parts, ProxyBody::upstream(body, event_stream))
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
/// negotiation dropped; the client's credentials replaced by the proxy's key; then the global
/// headers and the route's own edits.
fn upstream_headers(
    client: &HeaderMap,
    runtime: &Runtime,
    route: &Route,
    api_key: &HeaderValue,
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
    headers.insert(header::AUTHORIZATION, api_key.clone());
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
