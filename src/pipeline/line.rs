//! Batch lines through the pipeline: who owns a batch (the caller as the Batch API sees it), and
//! the [`LineExecutor`] that runs each line as its owner through [`super::execute_in_batch`], so
//! the owner's routes, models, limits and cache tenant apply to its lines as to its live requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::Method;
use http_body_util::BodyExt;

use super::inbound::Caller;
use super::{InternalRequest, Shared};
use crate::batch::{LineExecutor, LineFuture, LineOutcome, LineRequest, LineResponse};
use crate::config::UpstreamAuth;
use crate::error::ProxyError;
use crate::runtime::Runtime;

/// Owner prefix of a caller known by its inbound token's name.
const TOKEN: &str = "token:";
/// Owner prefix of a caller known by the SHA-256 of its own upstream key.
const KEY: &str = "key:";
/// The owner on an open proxy (no tokens) that holds its own key, when the caller sent none.
const ANYONE: &str = "local";

/// The Batch API caller of a request: its owner string, and its own key when it sent one.
pub struct BatchCaller {
    pub owner: String,
    /// The inbound token's name, for logs.
    pub token: Option<Arc<str>>,
    key: Option<HeaderValue>,
}

impl BatchCaller {
    /// The caller of a Batch API request with `headers`, authenticated like any other request:
    /// a missing or wrong token is the same 401, and so is a missing key where the proxy forwards
    /// each caller's own key.
    pub fn of(runtime: &Runtime, headers: &HeaderMap) -> Result<BatchCaller, ProxyError> {
        let caller = Caller::of(runtime, headers)?;
        if let Some(token) = caller.token {
            return Ok(BatchCaller {
                owner: format!("{TOKEN}{}", token.name),
                token: Some(token.name.clone()),
                key: None,
            });
        }
        match caller.key {
            Some(key) => Ok(BatchCaller {
                owner: format!(
                    "{KEY}{}",
                    crate::auth::hex(&crate::auth::sha256(key.as_bytes()))
                ),
                token: None,
                key: Some(key),
            }),
            None if runtime.upstreams.default_upstream().auth == UpstreamAuth::Passthrough => {
                Err(ProxyError::MissingCredentials)
            }
            None => Ok(BatchCaller {
                owner: ANYONE.to_owned(),
                token: None,
                key: None,
            }),
        }
    }
}

/// The own keys of callers known by their key, kept in memory only (never in the batch store,
/// never logged): a line of such a caller goes upstream with its key. After a restart a key is
/// known again with the caller's next Batch API call (its polling); until then its lines that
/// need the key are retried with the usual backoff (and fail once out of retries).
#[derive(Default)]
pub struct CallerKeys(Mutex<HashMap<String, HeaderValue>>);

impl CallerKeys {
    /// Remembers the key of `caller`, if it sent one.
    pub fn remember(&self, caller: &BatchCaller) {
        if let Some(key) = &caller.key {
            let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if keys.get(&caller.owner) != Some(key) {
                keys.insert(caller.owner.clone(), key.clone());
            }
        }
    }

    fn get(&self, owner: &str) -> Option<HeaderValue> {
        let keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(owner).cloned()
    }
}

/// Runs batch lines through the pipeline, as their owner.
pub struct PipelineLines {
    shared: Arc<Shared>,
    keys: Arc<CallerKeys>,
}

impl PipelineLines {
    pub fn new(shared: Arc<Shared>, keys: Arc<CallerKeys>) -> PipelineLines {
        PipelineLines { shared, keys }
    }
}

impl LineExecutor for PipelineLines {
    fn execute(&self, line: LineRequest) -> LineFuture {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let token = line.owner.strip_prefix(TOKEN).map(str::to_owned);
        let key = line
            .owner
            .starts_with(KEY)
            .then(|| self.keys.get(&line.owner));
        let key_unknown = matches!(key, Some(None));
        if let Some(Some(key)) = key {
            headers.insert(header::AUTHORIZATION, key);
        }
        let request = InternalRequest {
            method: Method::POST,
            path: line.path,
            headers,
            body: line.body,
            token,
        };
        let shared = self.shared.clone();
        // Dropping this future drops the pipeline's answer with it, which cancels the upstream
        // request: the worker's lease bound and a shutdown stop the work, not just the wait.
        Box::pin(async move {
            let response = super::execute_in_batch(&shared, request, Some(line.batch_id)).await;
            let (parts, body) = response.into_parts();
            let body = match body.collect().await {
                Ok(body) => body.to_bytes(),
                Err(error) => return LineOutcome::Unreachable(error.to_string()),
            };
            let missing_key = parts.status == http::StatusCode::UNAUTHORIZED
                && String::from_utf8_lossy(&body).contains(ProxyError::MissingCredentials.kind());
            if key_unknown && missing_key {
                return LineOutcome::Unreachable(
                    "the owner's own key is kept in memory only and is not known since the \
                     proxy started; it is known again at the owner's next Batch API call"
                        .to_owned(),
                );
            }
            let header =
                |name: &header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
            LineOutcome::Answered(LineResponse {
                status: parts.status.as_u16(),
                body,
                request_id: header(&super::headers::X_REQUEST_ID)
                    .unwrap_or_default()
                    .to_owned(),
                retry_after: header(&header::RETRY_AFTER).and_then(retry_after),
            })
        })
    }
}

/// A `Retry-After` in seconds (the form upstreams send); a date or garbage is ignored, and the
/// backoff applies.
fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::retry_after;
    use std::time::Duration;

    #[test]
    fn retry_after_is_read_in_seconds_only() {
        assert_eq!(retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after("-1"), None);
    }
}
