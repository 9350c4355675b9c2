//! One error type for the pipeline, and the single place where errors become OpenAI-shaped JSON
//! responses with a status that follows from where the fault lies.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::relay::ProxyBody;

/// Everything that can end a request before an upstream answer is relayed.
#[derive(Debug)]
pub enum ProxyError {
    // The client's fault (4xx).
    InvalidJson(String),
    MissingModel,
    ModelNotString,
    UnsupportedContentType(String),
    BodyTooLarge { limit: usize },
    ClientBody(String),
    UnknownPath,
    BadPath,
    // Ours or the deployment's (5xx).
    NoApiKey,
    // The upstream's (502/504).
    UpstreamConnect(String),
    UpstreamTimeout(Duration),
    Upstream(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::MissingModel
            | ProxyError::ModelNotString
            | ProxyError::UnsupportedContentType(_)
            | ProxyError::ClientBody(_)
            | ProxyError::BadPath => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UnknownPath => StatusCode::NOT_FOUND,
            ProxyError::NoApiKey => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short, fixed label for metrics and logs (low cardinality, never client data).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::MissingModel => "missing_model",
            ProxyError::ModelNotString => "invalid_model",
            ProxyError::UnsupportedContentType(_) => "unsupported_content_type",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "client_body_error",
            ProxyError::UnknownPath => "unknown_path",
            ProxyError::BadPath => "invalid_path",
            ProxyError::NoApiKey => "missing_api_key",
            ProxyError::UpstreamConnect(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::Upstream(_) => "upstream_error",
        }
    }

    fn error_type(&self) -> &'static str {
        match self.status().as_u16() {
            400..=499 => "invalid_request_error",
            502 | 504 => "upstream_error",
            _ => "proxy_error",
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
            ProxyError::ClientBody(reason) => format!("could not read the request body: {reason}"),
            ProxyError::UnknownPath => {
                "unknown path: the OpenAI-compatible API is served under /v1/".to_owned()
            }
            ProxyError::BadPath => {
                "invalid path: dot segments and encoded slashes are not allowed".to_owned()
            }
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
        }
    }

    /// The OpenAI-shaped JSON error response.
    pub fn into_response(self) -> Response<ProxyBody> {
        json_error(
            self.status(),
            &self.message(),
            self.error_type(),
            self.kind(),
        )
    }
}

/// `{"error":{"message","type","param","code"}}` with the given status.
pub fn json_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
