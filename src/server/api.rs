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
use crate::pipeline::Shared;
use crate::shape::Shape;

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
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
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
    let answer = match &api.batch {
        Some(batch) if crate::batch::owns(request.uri().path()) => {
            batch_api(&api, batch, request).await
        }
        _ => {
            let Ok(response) = crate::pipeline::handle(api.shared.clone(), request).await;
            response.map(Either::Left)
        }
    };
    Ok(answer.map(|inner| ApiResponseBody { inner, _live: live }))
}

/// A Batch API request, on behalf of its authenticated caller.
async fn batch_api(
    api: &Api,
    batch: &BatchService,
    request: Request<Incoming>,
) -> Response<Either<ProxyBody, ApiBody>> {
    let runtime = api.shared.runtime.load();
    match BatchCaller::of(&runtime, request.headers()) {
        Ok(caller) => {
            api.keys.remember(&caller);
            let response = batch.handle(&caller.owner, request).await;
            response.map(Either::Right)
        }
        Err(error) => {
            let shape = Shape::of(request.method(), request.uri().path());
            let response = error.into_response(shape);
            response.map(|bytes| Either::Left(ProxyBody::full(bytes)))
        }
    }
}
