//! One error type for the pipeline, and the single place where errors become JSON in the
//! client's API shape (OpenAI's, or Anthropic's on the Messages path), as a response with a status
//! that follows from where the fault lies, or as the SSE event that ends a broken stream.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::shape::Shape;

/// Everything that can end a request before an upstream answer is relayed, or (`StreamBroken`)
/// while one is.
#[derive(Debug)]
pub enum ProxyError {
    // The client's fault (4xx).
    InvalidJson(String),
    MissingModel,
    ModelNotString,
    UnsupportedContentType(String),
    BodyTooLarge {
        limit: usize,
    },
    /// A streamed (non-JSON) body over `max_upload_bytes`.
    UploadTooLarge {
        limit: u64,
    },
    /// The body did not arrive within `body_read_timeout`.
    BodyTimeout(Duration),
    /// A `Content-Encoding` the proxy cannot decode (the name, as sent).
    UnsupportedEncoding(String),
    /// A body that does not decode with its `Content-Encoding`.
    BadEncoding(String),
    ClientBody(String),
    UnknownPath,
    BadPath,
    MissingCredentials,
    /// No valid inbound token.
    Unauthorized,
    /// The token may not use this route or model (what, quoted).
    Forbidden(String),
    /// Over a route's or token's concurrency limit.
    Overloaded {
        scope: String,
        limit: usize,
    },
    /// Over a route's or token's spend budget (the message says the budget, the spend and when it
    /// resets).
    BudgetExceeded {
        message: String,
        retry_after: Duration,
    },
    /// Over a route's or token's request rate.
    RateLimited {
        scope: String,
        per_minute: u32,
        retry_after: Duration,
    },
    // Ours or the deployment's (5xx).
    NoApiKey,
    // The upstream's (502/504).
    UpstreamConnect(String),
    UpstreamTimeout(Duration),
    Upstream(String),
    /// Every model of the chain failed (or was cooling down).
    AllAttemptsFailed {
        status: StatusCode,
        attempts: Vec<AttemptNote>,
    },
    /// A stream broke after content reached the client (rendered as its last event).
    StreamBroken(String),
}

/// One attempt of a request that failed everywhere: which model, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptNote {
    pub model: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl AttemptNote {
    pub fn failed(model: &str, reason: String, status: Option<StatusCode>) -> AttemptNote {
        AttemptNote {
            model: model.to_owned(),
            reason,
            status: status.map(|s| s.as_u16()),
        }
    }

    pub fn skipped(model: &str) -> AttemptNote {
        AttemptNote {
            model: model.to_owned(),
            reason: "skipped: cooling down after repeated failures".to_owned(),
            status: None,
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::MissingModel
            | ProxyError::ModelNotString
            | ProxyError::UnsupportedContentType(_)
            | ProxyError::ClientBody(_)
            | ProxyError::BadEncoding(_)
            | ProxyError::BadPath => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } | ProxyError::UploadTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::UnknownPath => StatusCode::NOT_FOUND,
            ProxyError::MissingCredentials | ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::Overloaded { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoApiKey => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect(_)
            | ProxyError::Upstream(_)
            | ProxyError::StreamBroken(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::AllAttemptsFailed { status, .. } => *status,
        }
    }

    /// A short, fixed label for metrics and logs (low cardinality, never client data).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::MissingModel => "missing_model",
            ProxyError::ModelNotString => "invalid_model",
            ProxyError::UnsupportedContentType(_) => "unsupported_content_type",
            ProxyError::BodyTooLarge { .. } | ProxyError::UploadTooLarge { .. } => "body_too_large",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            ProxyError::BadEncoding(_) => "invalid_content_encoding",
            ProxyError::ClientBody(_) => "client_body_error",
            ProxyError::UnknownPath => "unknown_path",
            ProxyError::BadPath => "invalid_path",
            ProxyError::NoApiKey => "missing_api_key",
            ProxyError::MissingCredentials => "missing_credentials",
            ProxyError::Unauthorized => "invalid_api_key",
            ProxyError::Forbidden(_) => "not_allowed",
            ProxyError::Overloaded { .. } => "concurrency_limit_exceeded",
            ProxyError::RateLimited { .. } => "rate_limit_exceeded",
            ProxyError::BudgetExceeded { .. } => "budget_exceeded",
            ProxyError::UpstreamConnect(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::Upstream(_) => "upstream_error",
            ProxyError::AllAttemptsFailed { .. } => "all_attempts_failed",
            ProxyError::StreamBroken(_) => "upstream_stream_error",
        }
    }

    fn error_type(&self) -> &'static str {
        if matches!(self, ProxyError::AllAttemptsFailed { .. }) {
            return "upstream_error";
        }
        match self.status().as_u16() {
            400..=499 => "invalid_request_error",
            502 | 504 => "upstream_error",
            _ => "proxy_error",
        }
    }

    /// The `error.type` Anthropic's API gives for the same status.
    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::InvalidJson(reason) => reason.clone(),
            ProxyError::MissingModel => "request body must name a `model`".to_owned(),
            ProxyError::ModelNotString => "`model` must be a string".to_owned(),
            ProxyError::UnsupportedContentType(found) => {
                format!("expected Content-Type application/json, got \"{found}\"")
            }
            ProxyError::BodyTooLarge { limit } => {
                format!("request body is larger than the proxy's limit of {limit} bytes")
            }
            ProxyError::UploadTooLarge { limit } => {
                format!("upload is larger than the proxy's limit of {limit} bytes")
            }
            ProxyError::BodyTimeout(after) => format!(
                "the request body did not arrive within {}",
                humantime::format_duration(*after)
            ),
            ProxyError::UnsupportedEncoding(name) => format!(
                "Content-Encoding \"{name}\" is not supported; send identity, gzip, deflate, br or zstd"
            ),
            ProxyError::BadEncoding(reason) => {
                format!("the request body does not decode with its Content-Encoding: {reason}")
            }
            ProxyError::ClientBody(reason) => format!("could not read the request body: {reason}"),
            ProxyError::UnknownPath => {
                "unknown path: the OpenAI-compatible API is served under /v1/".to_owned()
            }
            ProxyError::BadPath => {
                "invalid path: dot segments and encoded slashes are not allowed".to_owned()
            }
            ProxyError::MissingCredentials => {
                "this proxy forwards each caller's own key: send `Authorization: Bearer <OpenRouter key>` or `x-api-key: <OpenRouter key>`"
                    .to_owned()
            }
            ProxyError::Unauthorized => {
                "missing or invalid token: send `Authorization: Bearer <token>` (the SDK's api_key)"
                    .to_owned()
            }
            ProxyError::Forbidden(what) => format!("this token may not use {what}"),
            ProxyError::Overloaded { scope, limit } => {
                format!("too many requests in flight for {scope} (limit {limit}); retry shortly")
            }
            ProxyError::RateLimited {
                scope,
                per_minute,
                retry_after,
            } => format!(
                "rate limit of {per_minute} requests per minute reached for {scope}; retry in {}s",
                retry_after.as_secs_f64().ceil()
            ),
            ProxyError::BudgetExceeded { message, .. } => message.clone(),
            ProxyError::NoApiKey => {
                "the proxy has no upstream API key configured (see upstream.api_key_env / api_key_file)"
                    .to_owned()
            }
            ProxyError::UpstreamConnect(reason) => format!("upstream unreachable: {reason}"),
            ProxyError::UpstreamTimeout(after) => format!(
                "upstream sent no response within {}",
                humantime::format_duration(*after)
            ),
            ProxyError::Upstream(reason) => format!("upstream failed: {reason}"),
            ProxyError::AllAttemptsFailed { attempts, .. } => {
                let list: Vec<String> = attempts
                    .iter()
                    .map(|a| format!("{} ({})", a.model, a.reason))
                    .collect();
                format!("all {} attempts failed: {}", attempts.len(), list.join("; "))
            }
            ProxyError::StreamBroken(reason) => format!("upstream stream failed: {reason}"),
        }
    }

    /// The error as JSON in `shape`: a response body, or (`in_stream`) the data of an SSE event.
    fn to_json(&self, shape: Shape, in_stream: bool) -> serde_json::Value {
        let mut body = match (shape, in_stream) {
            (Shape::Messages, _) => serde_json::json!({
                "type": "error",
                "error": { "type": self.anthropic_type(), "message": self.message() },
            }),
            // The Responses API's own error event: what its SDKs surface as an `error` event.
            (Shape::Responses, true) => serde_json::json!({
                "type": "error",
                "code": self.kind(),
                "message": self.message(),
                "param": null,
            }),
            _ => serde_json::json!({
                "error": {
                    "message": self.message(),
                    "type": self.error_type(),
                    "param": null,
                    "code": self.kind(),
                }
            }),
        };
        if let (ProxyError::AllAttemptsFailed { attempts, .. }, Some(error)) =
            (self, body.get_mut("error"))
        {
            error["attempts"] = serde_json::json!(attempts);
        }
        body
    }

    /// The SSE event that ends a stream broken after content reached the client: the SDKs raise
    /// on an error event in their shape, while a stream that merely stops can look complete.
    pub fn stream_event(&self, shape: Shape) -> Bytes {
        let data = self.to_json(shape, true);
        // The leading blank line ends any event the upstream left unfinished.
        Bytes::from(match shape {
            Shape::Chat => format!("\n\ndata: {data}\n\n"),
            Shape::Messages | Shape::Responses => format!("\n\nevent: error\ndata: {data}\n\n"),
        })
    }

    /// The JSON error response in the client's `shape`.
    pub fn into_response(self, shape: Shape) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        if let ProxyError::AllAttemptsFailed { .. } = &self {
            // The proxy already tried every model it may: SDKs retrying would only add load.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        let retry_after = match &self {
            ProxyError::RateLimited { retry_after, .. }
            | ProxyError::BudgetExceeded { retry_after, .. } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            ProxyError::Overloaded { .. } => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        let body = self.to_json(shape, false).to_string();
        *response.body_mut() = Bytes::from(body);
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}
