//! Upstream attempts and the chain of them: sending one attempt, deciding whether its answer is a
//! failure another model may make up for (statuses, timeouts, errors sent with status 200, SSE
//! error events before content: see `inspect`), and continuing a stream that broke midway when
//! the route asks for it.

mod inspect;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::pipeline::body::JsonBody;
use crate::error::{AttemptNote, ProxyError};
use crate::health::Policy;
use crate::pipeline::intake::Upload;
use crate::pipeline::{strip_hop_by_hop, Shared, X_PROXY_ATTEMPTS, X_PROXY_MODEL};
use crate::record::RequestRecord;
use crate::pipeline::relay::{ProxyBody, Resume, ResumeFuture};
use crate::runtime::Runtime;
use crate::runtime::router::Route;
use crate::shape::Shape;
use crate::upstream::{OutBody, UpstreamClient};

/// What every attempt of one request shares.
pub(crate) struct Outbound<'a> {
    pub(crate) runtime: &'a Runtime,
    pub(crate) route: &'a Route,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    /// The raw body, sent as it is when the model is not rewritten.
    pub(crate) bytes: Bytes,
    pub(crate) json: Option<JsonBody>,
    /// A body streamed through as the client sends it: it can be sent once only.
    pub(crate) upload: Mutex<Option<Box<Upload>>>,
    /// How answers look: what completes a stream, what is an error.
    pub(crate) shape: Shape,
    /// More than one model may answer: failures are inspected and fall back.
    pub(crate) inspect: bool,
}

impl Outbound<'_> {
    fn body_for(&self, model: Option<&str>) -> OutBody {
        let upload = self.upload.lock().ok().and_then(|mut slot| slot.take());
        if let Some(upload) = upload {
            return OutBody::Stream(Box::pin(*upload));
        }
        match (model, &self.json) {
            (Some(model), Some(json)) => json.with_model(model).into(),
            _ => self.bytes.clone().into(),
        }
    }

    fn request(&self, body: OutBody) -> Request<OutBody> {
        upstream_request(&self.method, &self.uri, &self.headers, body)
    }

    /// Statuses another model may make up for: 408, 429, `fallback.on_status`, and on the Messages
    /// path Anthropic's 529 (overloaded).
    fn falls_back_on(&self, status: StatusCode) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || self.runtime.fallback_on_status(status.as_u16())
            || (self.shape == Shape::Messages && status.as_u16() == 529)
    }
}

/// Tries the models of the chain in order until one answers.
pub(crate) async fn run_chain(
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
                crate::record::metrics::fallback(&runtime.config, label, next, "cooldown");
            }
            continue;
        }
        tried += 1;
        record.attempts = tried;
        let started = Instant::now();
        match attempt(outbound, chain[index], model, started, record).await {
            Ok(mut response) => {
                crate::record::metrics::upstream_attempt(&runtime.config, label, "answered");
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
                crate::record::metrics::upstream_attempt(&runtime.config, label, failure.reason.label());
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
                    crate::record::metrics::fallback(&runtime.config, label, next, failure.reason.label());
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
    if out.inspect && out.falls_back_on(status) {
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
    let answer = inspect::Answer {
        status,
        started,
        serving: model,
    };
    let body = inspect::body(out, answer, &mut parts.headers, body, record).await?;
    Ok(Response::from_parts(parts, body))
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

fn upstream_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: OutBody,
) -> Request<OutBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    request
}

/// One upstream attempt up to the response head, bounded by the first-byte timeout.
async fn send(
    client: &UpstreamClient,
    request: Request<OutBody>,
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
                let request = upstream_request(&method, &uri, &headers, bytes.into());
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
