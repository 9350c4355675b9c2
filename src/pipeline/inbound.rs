//! The inbound phase: the client's path under `/v1`, who the caller is, and the body read once
//! (JSON whole, uploads streamed). Everything later phases need from the client is here.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use hyper::body::Incoming;

use super::body::{BodyError, JsonBody};
use super::intake::{BodyLimits, Upload};
use crate::auth::Token;
use crate::config::UpstreamAuth;
use crate::error::ProxyError;
use crate::runtime::router::RequestFacts;
use crate::runtime::Runtime;

/// A request as the pipeline holds it once read.
pub struct Inbound {
    pub method: Method,
    /// The full client path, e.g. `/v1/chat/completions`, checked to stay under `/v1`.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub caller: Caller,
    pub body: InboundBody,
}

/// Who is asking.
#[derive(Default)]
pub struct Caller {
    /// The inbound token, when tokens are configured.
    pub token: Option<Arc<Token>>,
    /// The caller's own upstream key (`Authorization`, or `x-api-key` as a bearer token), used
    /// where an upstream forwards each caller's key.
    pub key: Option<HeaderValue>,
}

/// The request body as the pipeline holds it.
pub enum InboundBody {
    /// Read whole (and decoded): JSON, or a small body of another kind.
    Whole {
        bytes: Bytes,
        json: Option<JsonBody>,
    },
    /// Streamed through as it arrives, with the model its form named.
    Upload {
        upload: Box<Upload>,
        model: Option<String>,
    },
}

impl Inbound {
    /// Reads a client's request: path and caller first (unknown callers are turned away before
    /// their body is read), then the body.
    pub async fn read(
        runtime: &Runtime,
        request: Request<Incoming>,
    ) -> Result<Inbound, ProxyError> {
        let (parts, body) = request.into_parts();
        let rest = crate::upstream::api_path(parts.uri.path())?;
        let caller = Caller::of(runtime, &parts.headers)?;
        let limits = BodyLimits::new(&runtime.config.server);
        let body = if streams_through(&parts.method, rest, &parts.headers) {
            let (upload, model) = Upload::start(&parts.headers, body, &limits).await?;
            InboundBody::Upload {
                upload: Box::new(upload),
                model,
            }
        } else {
            let bytes = super::intake::read_whole(&parts.headers, body, &limits).await?;
            InboundBody::whole(&parts.method, rest, &parts.headers, bytes)?
        };
        Ok(Inbound {
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            method: parts.method,
            headers: parts.headers,
            caller,
            body,
        })
    }

    /// The path below `/v1` (`/chat/completions`), as upstream paths are built from it.
    pub fn rest(&self) -> &str {
        self.path.strip_prefix("/v1").unwrap_or(&self.path)
    }

    pub fn model(&self) -> Option<&str> {
        match &self.body {
            InboundBody::Whole { json, .. } => json.as_ref().and_then(JsonBody::model),
            InboundBody::Upload { model, .. } => model.as_deref(),
        }
    }

    /// What routing looks at.
    pub fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            model: self.model(),
            path: &self.path,
            headers: &self.headers,
        }
    }

    /// Whose answers these are: callers with their own upstream keys, or their own tokens, never
    /// share cached answers.
    pub fn tenant(&self, runtime: &Runtime) -> Option<&[u8]> {
        let passthrough = runtime.upstreams.default_upstream().auth == UpstreamAuth::Passthrough;
        match (&self.caller.key, &self.caller.token) {
            (Some(key), _) if passthrough => Some(key.as_bytes()),
            (_, Some(token)) => Some(token.name.as_bytes()),
            _ => None,
        }
    }
}

impl Caller {
    /// The caller of a request with `headers`: its token (checked), and its own key.
    pub fn of(runtime: &Runtime, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        let token = runtime.tokens.authenticate(headers)?;
        // With tokens, `Authorization` carries the token, never an upstream key.
        let key = match token {
            Some(_) => None,
            None => crate::auth::callers_key(headers),
        };
        Ok(Caller { token, key })
    }
}

impl InboundBody {
    /// A body read whole: parsed when it is JSON (required on the model endpoints).
    pub fn whole(
        method: &Method,
        rest: &str,
        headers: &HeaderMap,
        bytes: Bytes,
    ) -> Result<InboundBody, ProxyError> {
        let json = parse_json(method, rest, headers, bytes.clone())?;
        Ok(InboundBody::Whole { bytes, json })
    }
}

/// Bodies that are not JSON and not needed for routing (multipart uploads, audio, files) are
/// streamed through; JSON, bodies of unknown type and what a model endpoint receives are read
/// whole.
fn streams_through(method: &Method, rest: &str, headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    !is_json(content_type) && !needs_model(method, rest)
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let suffix = essence
        .len()
        .checked_sub(5)
        .and_then(|at| essence.get(at..));
    essence.eq_ignore_ascii_case("application/json")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case("+json"))
}

/// Endpoints whose body must be JSON naming a model.
fn needs_model(method: &Method, rest: &str) -> bool {
    const ENDPOINTS: [&str; 4] = [
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/messages",
    ];
    method == Method::POST && ENDPOINTS.contains(&rest)
}

/// Parses JSON bodies (required for the model endpoints, and whenever the client says JSON).
/// Other bodies (empty GETs, bodies of unknown type) pass through as bytes.
fn parse_json(
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
    bytes: Bytes,
) -> Result<Option<JsonBody>, ProxyError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let says_json = content_type.is_some_and(is_json);
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

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_media_types_in_any_case() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/vnd.api+json ;x=1",
            "text/x+JSON",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in [
            "",
            "json",
            "+jso",
            "text/plain",
            "application/jsonl",
            "multipart/form-data",
        ] {
            assert!(!is_json(no), "{no}");
        }
    }
}
