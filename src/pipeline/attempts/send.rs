//! One upstream attempt: the request sent, its response head within the first-byte timeout, and
//! what went wrong when it went wrong, as a [`Failure`] another attempt may make up for.

use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{inspect, Outbound};
use crate::error::ProxyError;
use crate::pipeline::headers::strip_hop_by_hop;
use crate::pipeline::relay::ProxyBody;
use crate::record::RequestRecord;
use crate::runtime::pool::{self, EndpointLoad};
use crate::runtime::upstreams::{Tried, Upstream};
use crate::telemetry::{AttemptFacts, AttemptSpan};
use crate::upstream::{OutBody, UpstreamClient};

/// Why an attempt did not produce an answer for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Connect,
    Timeout,
    Status(u16),
    /// OpenRouter's "unavailable" answer with status 200: an `error` object in the JSON body, or an
    /// SSE error event before any content.
    Unavailable,
    /// The stream ended or broke before any content.
    StreamFailed,
    Transport,
    /// Every key of the upstream is out of rotation.
    NoKey,
}

impl Reason {
    /// The low-cardinality label of metrics and logs.
    pub(crate) fn label(self) -> &'static str {
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
            Reason::NoKey => "no_key",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: Reason,
    pub(crate) detail: String,
    pub(crate) status: Option<StatusCode>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) timeout: Duration,
}

impl Failure {
    pub(crate) fn new(reason: Reason, detail: String) -> Failure {
        Failure {
            reason,
            detail,
            status: None,
            retry_after: None,
            timeout: Duration::ZERO,
        }
    }

    /// A timeout after `timeout`, described by `what`.
    pub(crate) fn timed_out(what: &str, timeout: Duration) -> Failure {
        let mut failure = Failure::new(
            Reason::Timeout,
            format!("{what} within {}", humantime::format_duration(timeout)),
        );
        failure.timeout = timeout;
        failure
    }

    pub(crate) fn describe(&self) -> String {
        match self.reason {
            Reason::Status(status) if self.detail.is_empty() => format!("status {status}"),
            Reason::Status(status) => format!("status {status}: {}", self.detail),
            _ => self.detail.clone(),
        }
    }

    /// The status of the all-attempts-failed answer when this was the last failure.
    pub(crate) fn summary_status(&self) -> StatusCode {
        match (self.status, self.reason) {
            (Some(status), _) if status.as_u16() >= 400 => status,
            (_, Reason::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    pub(crate) fn into_error(self) -> ProxyError {
        match self.reason {
            Reason::Connect => ProxyError::UpstreamConnect(self.detail),
            Reason::Timeout => ProxyError::UpstreamTimeout(self.timeout),
            _ => ProxyError::Upstream(self.describe()),
        }
    }
}

/// One upstream attempt, with its trace span (a child of the request's, ended when the answer
/// ends, or failed with the reason). `Ok` is an answer the client gets (success, or an error
/// that is the client's own); `Err` is a failure another attempt may make up for.
pub(crate) async fn attempt(
    out: &Outbound<'_>,
    position: usize,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, Failure> {
    let mut span = None;
    let answer = answer(out, position, record, &mut span).await;
    let span = span.unwrap_or_default();
    match answer {
        Ok(response) if span.is_active() => Ok(response.map(|body| body.holding(span))),
        Ok(response) => Ok(response),
        Err(failure) => {
            span.fail(failure.reason.label());
            Err(failure)
        }
    }
}

async fn answer(
    out: &Outbound<'_>,
    position: usize,
    record: &mut RequestRecord,
    span: &mut Option<AttemptSpan>,
) -> Result<Response<ProxyBody>, Failure> {
    let planned = out.attempts[position];
    let upstream = out.runtime.upstreams.at(planned.upstream);
    let timeout = out
        .route
        .first_byte_timeout
        .unwrap_or(upstream.first_byte_timeout);
    let started = Instant::now();
    let sending = Sending {
        upstream,
        model: planned.model,
        timeout,
    };
    let (response, in_flight) = dispatch(out, sending, record, span).await?;
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
        serving: position,
        timeout,
        idle: upstream.stream_idle_timeout,
        capture: record.span.captures_content(),
    };
    let body = inspect::body(out, answer, &mut parts.headers, body, record).await?;
    Ok(Response::from_parts(parts, body.holding(in_flight)))
}

/// Sends one attempt on `upstream`: to an endpoint of its (a failed connection is tried again on
/// another endpoint), with a key of its pool (a key refused, out of credit or rate limited is
/// taken out and the request sent again with another key). Neither counts as a fallback.
async fn dispatch(
    out: &Outbound<'_>,
    sending: Sending<'_>,
    record: &mut RequestRecord,
    span: &mut Option<AttemptSpan>,
) -> Result<(Response<Incoming>, EndpointLoad), Failure> {
    let Sending {
        upstream,
        model,
        timeout,
    } = sending;
    let cooldown = out.runtime.config.fallback.cooldown;
    let mut tried = Tried::default();
    loop {
        let now = Instant::now();
        let pick = upstream
            .pick(out.callers_key.as_ref(), &tried, now)
            .ok_or_else(|| {
                Failure::new(
                    Reason::NoKey,
                    "no key of this upstream is in rotation".into(),
                )
            })?;
        let body = out
            .body_for(model)
            .ok_or_else(|| Failure::new(Reason::Transport, "the upload was already sent".into()))?;
        let endpoint = upstream.endpoints[pick.endpoint].clone();
        let mut request = out.request(upstream, &endpoint, pick.credentials.as_ref(), body)?;
        // One span per attempt, whatever endpoints and keys it takes: the upstream's parent.
        let span = span.get_or_insert_with(|| {
            record.span.attempt(&AttemptFacts {
                upstream: &upstream.name,
                provider: &upstream.provider,
                model: model.or(record.requested_model.as_deref()).unwrap_or(""),
                uri: request.uri(),
            })
        });
        span.inject(request.headers_mut());
        record.mark_dispatched();
        let load = EndpointLoad::begin(endpoint.clone());
        let response = match send(&upstream.client, request, timeout).await {
            Err(failure) if matches!(failure.reason, Reason::Connect | Reason::Transport) => {
                endpoint.eject(cooldown, &upstream.name);
                tried.endpoints.push(pick.endpoint);
                let another = tried.endpoints.len() < upstream.endpoints.len();
                if another && out.replayable() {
                    continue;
                }
                return Err(failure);
            }
            Err(failure) => return Err(failure),
            Ok(response) => response,
        };
        let status = response.status().as_u16();
        if let Some(key) = pick.key {
            record.key = Some(key.name.clone());
            // A pool moves on to another key; a single key has nowhere to go and stays.
            if let Some(why) = refused(status).filter(|_| upstream.keys.len() > 1) {
                let wait = retry_after(response.headers());
                match (status, wait) {
                    (429, Some(wait)) => key.take_out(wait.min(cooldown), why),
                    (429, None) => {}
                    _ => key.take_out(cooldown, why),
                }
                tried.keys.extend(pool::position(&upstream.keys, key));
                let another = pool::choose_key(&upstream.keys, &tried.keys, now).is_some();
                if another && out.replayable() {
                    continue;
                }
            } else if status < 400 {
                key.accepted();
            }
        }
        endpoint.answered(status, cooldown, &upstream.name);
        // Once, for the answer the attempt ends with (a key swapped before is not its answer).
        span.status(status);
        return Ok((response, load));
    }
}

/// Where one attempt goes.
struct Sending<'a> {
    upstream: &'a Upstream,
    /// The model the plan sends (`None`: the client's, unchanged).
    model: Option<&'a str>,
    timeout: Duration,
}

/// Why a key is taken out of rotation after an answer with `status`.
fn refused(status: u16) -> Option<&'static str> {
    match status {
        401 => Some("rejected (401)"),
        402 => Some("out of credit (402)"),
        403 => Some("forbidden (403)"),
        429 => Some("rate limited (429)"),
        _ => None,
    }
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

/// One upstream request up to the response head, bounded by the first-byte timeout.
pub(crate) async fn send(
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
        Err(_) => Err(Failure::timed_out("no response", first_byte_timeout)),
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
