//! The attributes a span starts with: the request's (GenAI, HTTP, `server.*`) and each
//! upstream attempt's.

use http::{Method, Version};
use opentelemetry::KeyValue;

use super::names::{self as semconv, ATTEMPT, UPSTREAM};
use super::span::{AttemptFacts, Inbound};

pub(super) fn request_attributes(inbound: &Inbound<'_>) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(semconv::GEN_AI_OPERATION_NAME, inbound.operation.to_owned()),
        KeyValue::new(semconv::GEN_AI_REQUEST_STREAM, inbound.stream),
        KeyValue::new(semconv::HTTP_REQUEST_METHOD, method_name(inbound.method)),
        KeyValue::new(semconv::URL_PATH, inbound.uri.path().to_owned()),
        KeyValue::new(
            semconv::URL_SCHEME,
            inbound.uri.scheme_str().unwrap_or("http").to_owned(),
        ),
        KeyValue::new(
            semconv::NETWORK_PROTOCOL_VERSION,
            protocol_version(inbound.version),
        ),
    ];
    if let Some(model) = inbound.requested_model {
        attributes.push(KeyValue::new(
            semconv::GEN_AI_REQUEST_MODEL,
            model.to_owned(),
        ));
    }
    let host = inbound
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .or_else(|| inbound.uri.authority().cloned());
    if let Some(host) = host {
        attributes.push(KeyValue::new(
            semconv::SERVER_ADDRESS,
            host.host().to_owned(),
        ));
        if let Some(port) = host.port_u16() {
            attributes.push(KeyValue::new(semconv::SERVER_PORT, i64::from(port)));
        }
    }
    attributes
}

/// The HTTP conventions name known methods and fold every other into `_OTHER`.
fn method_name(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "_OTHER",
    }
}

fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

pub(super) fn attempt_attributes(
    operation: &str,
    number: u32,
    facts: &AttemptFacts<'_>,
) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(semconv::GEN_AI_OPERATION_NAME, operation.to_owned()),
        KeyValue::new(semconv::GEN_AI_PROVIDER_NAME, facts.provider.to_owned()),
        KeyValue::new(semconv::GEN_AI_REQUEST_MODEL, facts.model.to_owned()),
        KeyValue::new(UPSTREAM, facts.upstream.to_owned()),
        KeyValue::new(ATTEMPT, i64::from(number)),
    ];
    // Without the query, which is the client's and may carry anything.
    if let (Some(scheme), Some(authority)) = (facts.uri.scheme_str(), facts.uri.authority()) {
        let url = format!("{scheme}://{authority}{}", facts.uri.path());
        attributes.push(KeyValue::new(semconv::URL_FULL, url));
    }
    if let Some(host) = facts.uri.host() {
        attributes.push(KeyValue::new(semconv::SERVER_ADDRESS, host.to_owned()));
        let port = facts.uri.port_u16().or(match facts.uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        if let Some(port) = port {
            attributes.push(KeyValue::new(semconv::SERVER_PORT, i64::from(port)));
        }
    }
    attributes
}
