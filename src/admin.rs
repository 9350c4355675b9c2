//! The admin listener: `/healthz` (alive), `/readyz` (config loaded, key present, not draining)
//! and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::proxy::Shared;
use crate::relay::ProxyBody;

/// Answers one admin request.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ));
    }
    let response = match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => readiness(&shared),
        "/metrics" => {
            let mut response = text(StatusCode::OK, crate::metrics::handle().render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    };
    Ok(response)
}

fn readiness(shared: &Shared) -> Response<ProxyBody> {
    if shared.draining.load(Ordering::Relaxed) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let runtime = shared.runtime.load();
    if runtime.api_key.is_none() {
        let reason = format!("no API key: nothing found in {}\n", runtime.api_key_source);
        return text(StatusCode::SERVICE_UNAVAILABLE, reason);
    }
    text(StatusCode::OK, "ready\n".into())
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
