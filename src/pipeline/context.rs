//! What one request carries through the phases: the runtime it started with, its record, the
//! limit slots it holds and its API shape; and how its outcome becomes the response.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Response};

use super::headers::X_REQUEST_ID;
use super::relay::ProxyBody;
use super::Shared;
use crate::error::ProxyError;
use crate::limits::Permit;
use crate::record::RequestRecord;
use crate::runtime::Runtime;
use crate::shape::Shape;

/// One request on its way through the pipeline.
pub struct RequestContext {
    /// The config this request started with serves it to the end, whatever reloads happen.
    pub runtime: Arc<Runtime>,
    pub record: Box<RequestRecord>,
    /// Concurrency slots held until the answer ends.
    pub permits: Vec<Permit>,
    /// The API the client speaks: how errors are rendered.
    pub shape: Shape,
    /// The request id as the header the upstream and the client see.
    pub request_id: HeaderValue,
}

impl RequestContext {
    pub fn new(
        shared: &Shared,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> RequestContext {
        let runtime = shared.runtime.load_full();
        let (id, request_id) = shared.request_id(headers);
        let record =
            RequestRecord::new(runtime.config.clone(), id, method.clone(), path.to_owned());
        RequestContext {
            runtime,
            record: Box::new(record),
            permits: Vec::new(),
            shape: Shape::of(method, path),
            request_id,
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
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), self.request_id);
        response.map(|body| body.with_record(self.record).with_permits(self.permits))
    }
}
