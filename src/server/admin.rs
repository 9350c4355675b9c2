//! The admin listener: `/healthz` (alive), `/readyz` (config loaded, key present, not draining),
//! `/metrics` (Prometheus text) and `/config` (which config is running, and how reloads went).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::pipeline::relay::ProxyBody;
use crate::pipeline::Shared;
use crate::runtime::ReloadLog;

/// Answers one admin request.
pub async fn handle(
    shared: Arc<Shared>,
    reloads: Arc<ReloadLog>,
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
        "/config" => config_identity(&shared, &reloads),
        "/metrics" => {
            shared.cache.publish_gauges();
            let mut response = text(StatusCode::OK, crate::record::metrics::handle().render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /config\n".into(),
        ),
    };
    Ok(response)
}

fn readiness(shared: &Shared) -> Response<ProxyBody> {
    if shared.draining.load(Ordering::Relaxed) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let runtime = shared.runtime.load();
    if let Some(upstream) = runtime.upstreams.iter().find(|u| !u.ready()) {
        let reason = format!(
            "no API key for upstream {}: nothing found in {}\n",
            upstream.name,
            upstream.key_sources().join(", ")
        );
        return text(StatusCode::SERVICE_UNAVAILABLE, reason);
    }
    text(StatusCode::OK, "ready\n".into())
}

/// The running config's identity, for operators checking that an edit was applied. Never the key
/// and never header values (they may hold secrets): names only.
fn config_identity(shared: &Shared, reloads: &ReloadLog) -> Response<ProxyBody> {
    let runtime = shared.runtime.load();
    let origin = &runtime.origin;
    let config = &runtime.config;
    let body = serde_json::json!({
        "hash": origin.hash,
        "loaded_at": humantime::format_rfc3339_seconds(origin.loaded_at).to_string(),
        "source": origin.source.as_ref().map(|path| path.display().to_string()),
        "reloads": { "ok": reloads.ok(), "error": reloads.errors() },
        "last_error": reloads.last_error(),
        "restart_pending": origin.restart_pending,
        "routes": config.routes.iter().map(|route| &route.name).collect::<Vec<_>>(),
        "upstream_headers": config.upstream.headers.keys().collect::<Vec<_>>(),
        "api_key": {
            "source": runtime.upstreams.default_upstream().key_sources().join(", "),
            "present": runtime.upstreams.default_upstream().ready(),
        },
        "upstreams": runtime.upstreams.iter().map(describe_upstream).collect::<Vec<_>>(),
    });
    let mut response = text(StatusCode::OK, format!("{body}\n"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An upstream for `/config`: its endpoints and where its keys come from, never a key.
fn describe_upstream(upstream: &crate::runtime::upstreams::Upstream) -> serde_json::Value {
    serde_json::json!({
        "name": &*upstream.name,
        "endpoints": upstream.endpoints.iter().map(|e| e.url.to_string()).collect::<Vec<_>>(),
        "keys": upstream.keys.iter().map(|k| serde_json::json!({
            "name": &*k.name,
            "source": k.source,
            "present": k.present(),
        })).collect::<Vec<_>>(),
    })
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
