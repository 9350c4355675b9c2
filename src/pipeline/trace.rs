//! The request's trace span, started once the request has been read, or has been refused while
//! being read (bad JSON, a body over the limit, an unknown caller): every answered request gets
//! one. Only with tracing on does anything here run.

use http::header::{self, HeaderMap};
use http::{Method, Uri, Version};

use super::inbound::{Inbound, InboundBody};
use super::RequestContext;
use crate::telemetry::{self, Telemetry};

/// What the span needs of the request's head, kept before the request is consumed by reading it:
/// the trace context (`traceparent`, `tracestate`) and `host` among the headers.
pub(super) struct TraceHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl TraceHead {
    pub(super) fn of(method: &Method, uri: &Uri, version: Version, all: &HeaderMap) -> TraceHead {
        let mut headers = HeaderMap::new();
        for name in [header::HOST.as_str(), "traceparent", "tracestate"] {
            for value in all.get_all(name) {
                headers.append(name, value.clone());
            }
        }
        TraceHead {
            method: method.clone(),
            uri: uri.clone(),
            version,
            headers,
        }
    }
}

/// Starts the request span of `ctx`: the operation from the path, the model and stream flag from
/// the body when it was read (`inbound`), the prompt too with `capture_content`.
pub(super) fn start(
    ctx: &mut RequestContext,
    telemetry: &Telemetry,
    head: &TraceHead,
    inbound: Option<&Inbound>,
) {
    let rest = head.uri.path().strip_prefix("/v1").unwrap_or("");
    let stream = match inbound.map(|i| &i.body) {
        Some(InboundBody::Whole { json, .. }) => json.as_ref().is_some_and(|j| j.stream),
        _ => false,
    };
    let record = &mut ctx.record;
    record.span = telemetry.start_request(&telemetry::Inbound {
        headers: &head.headers,
        method: &head.method,
        uri: &head.uri,
        version: head.version,
        received: record.started,
        operation: telemetry::names::operation(rest),
        requested_model: inbound.and_then(Inbound::model),
        stream,
    });
    if let Some(InboundBody::Whole { bytes, .. }) = inbound.map(|i| &i.body) {
        record.span.record_input(bytes);
    }
}
