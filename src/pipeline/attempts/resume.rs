//! Continuing a chat stream that broke after content reached the client, on the next attempts of
//! the plan, with the original messages plus the partial answer as an assistant prefix.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};

use super::send::send;
use super::Outbound;
use crate::pipeline::relay::{Resume, ResumeFuture};
use crate::upstream::UpstreamClient;

/// One attempt left to continue on, ready to send but for its body.
struct Prepared {
    client: UpstreamClient,
    uri: Uri,
    headers: HeaderMap,
    model: String,
}

/// The attempts left to continue on, and the body each continuation extends.
pub(super) struct Continuation {
    method: Method,
    body: serde_json::Map<String, serde_json::Value>,
    left: Arc<Mutex<VecDeque<Prepared>>>,
    timeout: Duration,
}

impl Continuation {
    /// The continuation of an answer served by attempt `serving` of the plan; `None` when the
    /// body has no messages to extend.
    pub(super) fn new(out: &Outbound<'_>, serving: usize) -> Option<Continuation> {
        let json = out.json.as_ref()?;
        let body: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&json.bytes).ok()?;
        body.get("messages")?.as_array()?;
        let left = out.attempts[serving + 1..]
            .iter()
            .filter_map(|attempt| {
                let upstream = out.runtime.upstreams.at(attempt.upstream);
                let (uri, headers) = out.prepare(upstream)?;
                Some(Prepared {
                    client: upstream.client.clone(),
                    uri,
                    headers,
                    model: attempt.model?.to_owned(),
                })
            })
            .collect();
        Some(Continuation {
            method: out.method.clone(),
            body,
            left: Arc::new(Mutex::new(left)),
            timeout: out
                .route
                .first_byte_timeout
                .unwrap_or_else(|| out.runtime.upstreams.default_upstream().first_byte_timeout),
        })
    }
}

impl Resume for Continuation {
    fn resume(&mut self, partial: &str) -> Option<ResumeFuture> {
        if self.left.lock().ok()?.is_empty() {
            return None;
        }
        let mut body = self.body.clone();
        if let Some(serde_json::Value::Array(messages)) = body.get_mut("messages") {
            messages.push(serde_json::json!({"role": "assistant", "content": partial}));
        }
        let method = self.method.clone();
        let left = self.left.clone();
        let timeout = self.timeout;
        Some(Box::pin(async move {
            loop {
                let next = left.lock().ok()?.pop_front()?;
                let model = next.model;
                body.insert("model".to_owned(), serde_json::Value::String(model.clone()));
                let bytes = Bytes::from(serde_json::to_vec(&body).ok()?);
                let request = super::upstream_request(&method, next.uri, next.headers, bytes);
                match send(&next.client, request, timeout).await {
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
