//! The attempts phase: the plan's attempts tried in order until one answers. Each attempt is sent
//! (see `send`), its answer read far enough to tell a failure another attempt may make up for from
//! an answer for the client (see `inspect`), and a chat stream that broke midway is continued on
//! the next attempts when the route asks for it (see `resume`).

mod inspect;
mod resume;
mod send;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};

use super::body::JsonBody;
use super::headers::{count_value, set_text, X_PROXY_ATTEMPTS, X_PROXY_MODEL, X_PROXY_UPSTREAM};
use super::intake::Upload;
use super::relay::ProxyBody;
use super::Shared;
use crate::error::{AttemptNote, ProxyError};
use crate::health::{Policy, Target};
use crate::record::RequestRecord;
use crate::runtime::pool::Endpoint;
use crate::runtime::router::{Attempt, Route};
use crate::runtime::upstreams::{Tried, Upstream};
use crate::runtime::Runtime;
use crate::shape::Shape;
use crate::upstream::OutBody;
use send::{Failure, Reason};

/// What every attempt of one request shares.
pub(crate) struct Outbound<'a> {
    pub(crate) runtime: &'a Arc<Runtime>,
    pub(crate) route: &'a Route,
    pub(crate) attempts: &'a [Attempt<'a>],
    pub(crate) method: Method,
    /// The client's path below `/v1` and its query, as every upstream path is built from them.
    pub(crate) rest: &'a str,
    pub(crate) query: Option<&'a str>,
    /// The client's headers as every upstream sees them (see `headers::for_upstream`).
    pub(crate) headers: HeaderMap,
    /// The caller's own key, for upstreams that forward it.
    pub(crate) callers_key: Option<HeaderValue>,
    /// The raw body, sent as it is when the model is not rewritten.
    pub(crate) bytes: Bytes,
    pub(crate) json: Option<JsonBody>,
    /// A body streamed through as the client sends it: it can be sent once only.
    pub(crate) upload: Mutex<Option<Box<Upload>>>,
    /// The body is such an upload.
    pub(crate) streamed: bool,
    /// How answers look: what completes a stream, what is an error.
    pub(crate) shape: Shape,
    /// More than one attempt may answer: failures are inspected and fall back.
    pub(crate) inspect: bool,
}

impl Outbound<'_> {
    /// The body of an attempt on `model`: the model rewritten, the route's body policy applied.
    /// `None` once a streamed upload was sent (it cannot be sent twice).
    fn body_for(&self, model: Option<&str>) -> Option<OutBody> {
        if self.streamed {
            let upload = self.upload.lock().ok()?.take()?;
            return Some(OutBody::Stream(Box::pin(*upload)));
        }
        let Some(json) = &self.json else {
            return Some(self.bytes.clone().into());
        };
        let body = match model {
            Some(model) => json.with_model(model),
            None => json.bytes.clone(),
        };
        let patched = self.route.body_policy.as_ref().and_then(|p| p.apply(&body));
        Some(patched.unwrap_or(body).into())
    }

    /// Whether the body can be sent again (to another endpoint, with another key).
    fn replayable(&self) -> bool {
        !self.streamed
    }

    /// The request of one try on `upstream`: the endpoint's URI, the headers with `credentials`.
    fn request(
        &self,
        upstream: &Upstream,
        endpoint: &Endpoint,
        credentials: Option<&HeaderValue>,
        body: OutBody,
    ) -> Result<Request<OutBody>, Failure> {
        let uri = endpoint
            .base
            .join(self.rest, self.query)
            .map_err(|e| Failure::new(Reason::Transport, e.to_string()))?;
        let headers = super::headers::for_attempt(&self.headers, upstream, self.route, credentials);
        Ok(upstream_request(&self.method, uri, headers, body))
    }

    /// Where a later request on `upstream` goes (an endpoint and key chosen now), for resuming.
    fn prepare(&self, upstream: &Upstream) -> Option<(Uri, HeaderMap)> {
        let pick = upstream.pick(self.callers_key.as_ref(), &Tried::default(), Instant::now())?;
        let endpoint = &upstream.endpoints[pick.endpoint];
        let uri = endpoint.base.join(self.rest, self.query).ok()?;
        let credentials = pick.credentials.as_ref();
        let headers = super::headers::for_attempt(&self.headers, upstream, self.route, credentials);
        Some((uri, headers))
    }

    /// Statuses another attempt may make up for: 408, 429, `fallback.on_status`, and on the
    /// Messages path Anthropic's 529 (overloaded).
    fn falls_back_on(&self, status: StatusCode) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || self.runtime.fallback_on_status(status.as_u16())
            || (self.shape == Shape::Messages && status.as_u16() == 529)
    }
}

fn upstream_request<B: Into<OutBody>>(
    method: &Method,
    uri: Uri,
    headers: HeaderMap,
    body: B,
) -> Request<OutBody> {
    let mut request = Request::new(body.into());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// Where the chain stands.
struct Chain {
    notes: Vec<AttemptNote>,
    last_failure: Option<Failure>,
    retried_in_place: bool,
    index: usize,
    tried: usize,
}

/// Tries the plan's attempts in order until one answers.
pub(crate) async fn run_chain(
    shared: &Shared,
    out: &Outbound<'_>,
    requested_model: Option<&str>,
    record: &mut RequestRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let config = &out.runtime.config;
    let max_attempts = config.fallback.max_attempts;
    let policy = Policy {
        failures: config.fallback.cooldown_failures,
        cooldown: config.fallback.cooldown,
    };
    let label_of = |i: usize| out.attempts[i].model.or(requested_model).unwrap_or("");
    let mut chain = Chain {
        notes: Vec::new(),
        last_failure: None,
        retried_in_place: false,
        index: 0,
        tried: 0,
    };
    while chain.index < out.attempts.len() && chain.tried < max_attempts {
        let label = label_of(chain.index);
        let serving = out.runtime.upstreams.at(out.attempts[chain.index].upstream);
        let upstream = &serving.name;
        let target = Target {
            upstream,
            model: label,
        };
        let untried_last = chain.tried == 0 && chain.index + 1 == out.attempts.len();
        if !untried_last && shared.health.should_skip(target, clock_now(), policy) {
            // Cooling down after repeated failures; the last attempt is made anyway rather than
            // failing the request without a single one.
            chain.notes.push(AttemptNote::skipped(label));
            chain.index += 1;
            if chain.index < out.attempts.len() {
                record.fallback(label, label_of(chain.index), "cooldown");
            }
            continue;
        }
        chain.tried += 1;
        record.attempts = chain.tried;
        let model = out.attempts[chain.index].model.or(requested_model);
        match send::attempt(out, chain.index, record).await {
            Ok(mut response) => {
                record.attempt_answered(upstream, label);
                shared.health.record_success(target);
                record.served_model = model.map(str::to_owned);
                record.upstream = Some(upstream.clone());
                record.provider = Some(serving.provider.clone());
                let headers = response.headers_mut();
                if let Some(model) = model {
                    set_text(headers, &X_PROXY_MODEL, model);
                }
                if let Some(name) = &serving.name_header {
                    headers.insert(X_PROXY_UPSTREAM.clone(), name.clone());
                }
                let tried = count_value(chain.tried);
                headers.insert(X_PROXY_ATTEMPTS.clone(), tried);
                return Ok(response);
            }
            Err(failure) => {
                shared.health.record_failure(target, clock_now(), policy);
                record.attempt_failed(upstream, label, failure.reason.label());
                if let Some(wait) = chain.failed(out, failure, label, record) {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                if chain.index < out.attempts.len() && chain.tried < max_attempts {
                    let reason = chain.last_failure.as_ref().map_or("", |f| f.reason.label());
                    record.fallback(label, label_of(chain.index), reason);
                }
            }
        }
    }
    Err(chain.into_error())
}

impl Chain {
    /// Notes a failed attempt. Returns how long to wait before trying the same attempt again (a
    /// short `Retry-After` on a 429 is worth waiting for, once); otherwise moves on.
    fn failed(
        &mut self,
        out: &Outbound<'_>,
        failure: Failure,
        label: &str,
        record: &mut RequestRecord,
    ) -> Option<Duration> {
        tracing::warn!(
            request_id = %record.request_id,
            model = label,
            reason = %failure.describe(),
            "upstream attempt failed"
        );
        self.notes.push(AttemptNote::failed(
            label,
            failure.describe(),
            failure.status,
        ));
        let fallback = &out.runtime.config.fallback;
        let wait = failure
            .retry_after
            .filter(|wait| *wait <= fallback.retry_after_max)
            .filter(|_| !self.retried_in_place && self.tried < fallback.max_attempts);
        self.last_failure = Some(failure);
        self.retried_in_place = wait.is_some();
        if wait.is_none() {
            self.index += 1;
        }
        wait
    }

    fn into_error(self) -> ProxyError {
        match (self.last_failure, self.notes.len()) {
            // A single attempt keeps its own precise error (unreachable 502, timeout 504).
            (Some(failure), 1) => failure.into_error(),
            (last, _) => ProxyError::AllAttemptsFailed {
                status: last.map_or(StatusCode::BAD_GATEWAY, |f| f.summary_status()),
                attempts: self.notes,
            },
        }
    }
}

/// Now, for cool-downs: Tokio's clock, which tests can pause and advance (outside tests it is the
/// system's monotonic clock).
fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}
