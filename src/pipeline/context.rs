//! What one request carries through the phases: the runtime it started with, its record, the
//! limit slots it holds and its API shape; and how its outcome becomes the response.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Response, Uri, Version};

use super::headers::X_REQUEST_ID;
use super::inbound::{Inbound, InboundBody};
use super::relay::ProxyBody;
use super::Shared;
use crate::error::ProxyError;
use crate::limits::Permit;
use crate::record::RequestRecord;
use crate::runtime::Runtime;
use crate::shape::Shape;
use crate::telemetry::{self, Telemetry};

/// One request on its way through the pipeline.
pub struct RequestContext {
    /// The config this request started with serves it to the end, whatever reloads happen.
    pub runtime: Arc<Runtime>,
    pub record: Box<RequestRecord>,
    /// Concurrency slots held until the answer ends.
    pub permits: Vec<Permit>,
    /// The API the client speaks: how errors are rendered.
    pub shape: Shape,
}

impl RequestContext {
    pub fn new(
        shared: &Shared,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> RequestContext {
        let runtime = shared.runtime.load_full();
        let record = RequestRecord::new(
            runtime.config.clone(),
            shared.request_id(headers),
            method.clone(),
            path.to_owned(),
        );
        RequestContext {
            runtime,
            record: Box::new(record),
            permits: Vec::new(),
            shape: Shape::of(method, path),
        }
    }

    /// Starts the request's trace span once its body is read (a no-op without tracing): the
    /// operation from the path, the model and stream flag from the body, the HTTP attributes
    /// from `version` and `uri`; the prompt too with `capture_content`.
    pub fn start_span(
        &mut self,
        telemetry: &Telemetry,
        inbound: &Inbound,
        version: Version,
        uri: &Uri,
    ) {
        if !telemetry.is_enabled() {
            return;
        }
        let stream = match &inbound.body {
            InboundBody::Whole { json, .. } => json.as_ref().is_some_and(|j| j.stream),
            InboundBody::Upload { .. } => false,
        };
        let record = &mut self.record;
        record.span = telemetry.start_request(&telemetry::Inbound {
            headers: &inbound.headers,
            method: &inbound.method,
            uri,
            version,
            received: record.started,
            operation: telemetry::names::operation(inbound.rest()),
            requested_model: inbound.model(),
            stream,
        });
        if let InboundBody::Whole { bytes, .. } = &inbound.body {
            record.span.record_input(bytes);
        }
    }

    /// The response for the request's outcome: the answer, or the error rendered in the client's
    /// API shape; with its request id, and carrying the record and the limit slots to the end.
    pub fn respond(
        mut self,
        outcome: Result<Response<ProxyBody>, ProxyError>,
    ) -> Response<ProxyBody> {
        let mut response = match outcome {
            Ok(response) => response,
            Err(error) => {
                self.record.error = Some(error.kind());
                tracing::debug!(request_id = %self.record.request_id, error = %error.message(), "request failed");
                error.into_response(self.shape).map(ProxyBody::full)
            }
        };
        self.record.status = response.status().as_u16();
        if let Ok(id) = HeaderValue::from_str(&self.record.request_id) {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        response.map(|body| body.with_record(self.record).with_permits(self.permits))
    }
}
