//! The API listener's request handler: the Batch API's paths to the batch service when `[batch]`
//! is configured, everything else to the pipeline; and the live in-flight count that batch work
//! yields to.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::batch::{ApiBody, BatchService};
use crate::pipeline::line::{BatchCaller, CallerKeys};
use crate::pipeline::relay::ProxyBody;
use crate::pipeline::{RequestContext, Shared};
use crate::record::{Outcome, RequestRecord};
use crate::shape::Shape;

/// The `route` of Batch API requests in the access log and the request metrics.
const BATCH_API_ROUTE: &str = "batch_api";

/// What the API listener serves with.
pub(crate) struct Api {
    pub shared: Arc<Shared>,
    /// The Batch API, when `[batch]` was configured at start-up.
    pub batch: Option<Arc<BatchService>>,
    /// Own keys of Batch API callers known by their key, for their lines.
    pub keys: Arc<CallerKeys>,
    /// Client requests being served (batch lines are not: they do not come through here).
    pub live: Arc<AtomicUsize>,
}

/// A response body of the API listener; while it lives, its request counts as live.
pub(crate) struct ApiResponseBody {
    inner: Either<ProxyBody, ApiBody>,
    /// A Batch API request's record, written when the body ends or is dropped (pipeline
    /// answers carry theirs inside their body).
    record: Option<Box<RequestRecord>>,
    _live: LiveRequest,
}

/// One request in the live count, from its arrival until its response body is done or dropped.
struct LiveRequest(Arc<AtomicUsize>);

impl LiveRequest {
    fn new(live: &Arc<AtomicUsize>) -> LiveRequest {
        live.fetch_add(1, Ordering::Relaxed);
        LiveRequest(live.clone())
    }
}

impl Drop for LiveRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Body for ApiResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(record) = &mut this.record {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    record.on_data(frame.data_ref().map_or(&[][..], |data| data.as_ref()));
                    // hyper stops polling a body that says it has ended.
                    if this.inner.is_end_stream() {
                        record.outcome = Outcome::Complete;
                    }
                }
                Poll::Ready(None) => record.outcome = Outcome::Complete,
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Handles one request on the API listener.
pub(crate) async fn handle(
    api: Arc<Api>,
    request: Request<Incoming>,
) -> Result<Response<ApiResponseBody>, Infallible> {
    let live = LiveRequest::new(&api.live);
    // The request's work is boxed: hyper keeps room for this future for as long as the connection
    // lives, so it stays a few words instead of the size of the pipeline's largest state.
    let (answer, record) = match &api.batch {
        Some(batch) if crate::batch::owns(request.uri().path()) => {
            let (answer, record) = Box::pin(batch_api(&api, batch, request)).await;
            (answer, Some(record))
        }
        _ => {
            let handled = Box::pin(crate::pipeline::handle(api.shared.clone(), request));
            let Ok(response) = handled.await;
            (response.map(Either::Left), None)
        }
    };
    Ok(answer.map(|inner| ApiResponseBody {
        inner,
        record,
        _live: live,
    }))
}

/// A Batch API request, on behalf of its authenticated caller, with the record of its access-log
/// line (its owner's token as `caller`, never a key).
async fn batch_api(
    api: &Api,
    batch: &BatchService,
    request: Request<Incoming>,
) -> (Response<Either<ProxyBody, ApiBody>>, Box<RequestRecord>) {
    let (method, path) = (request.method(), request.uri().path());
    let ctx = RequestContext::new(&api.shared, method, path, request.headers());
    let mut record = ctx.record;
    record.route = Arc::from(BATCH_API_ROUTE);
    let mut response = match BatchCaller::of(&ctx.runtime, request.headers()) {
        Ok(caller) => {
            api.keys.remember(&caller);
            record.caller = caller.token.clone();
            let response = batch.handle(&caller.owner, request).await;
            response.map(Either::Right)
        }
        Err(error) => {
            record.error = Some(error.kind());
            let response = error.into_response(Shape::of(method, path));
            response.map(|bytes| Either::Left(ProxyBody::full(bytes)))
        }
    };
    record.status = response.status().as_u16();
    let name = crate::pipeline::headers::X_REQUEST_ID.clone();
    response.headers_mut().insert(name, ctx.request_id);
    if http_body::Body::is_end_stream(response.body()) {
        record.outcome = Outcome::Complete;
    }
    (response, record)
}
