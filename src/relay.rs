//! The response body handed to the client: an upstream body relayed frame by frame as it arrives,
//! or a complete body of our own. It also carries the request's record, written when the body ends
//! or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client receives as a response body.
pub struct ProxyBody {
    source: Source,
    record: Option<Box<RequestRecord>>,
}

enum Source {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        /// An SSE stream that fails midway ends with an error event instead of a cut connection.
        event_stream: bool,
    },
    Done,
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody {
            source: Source::Full(Some(bytes)),
            record: None,
        }
    }

    pub fn upstream(body: Incoming, event_stream: bool) -> ProxyBody {
        ProxyBody {
            source: Source::Upstream { body, event_stream },
            record: None,
        }
    }

    /// Attaches the record that is finished when this body ends or is dropped.
    pub fn with_record(mut self, record: Box<RequestRecord>) -> ProxyBody {
        self.record = Some(record);
        self
    }

    fn on_data(&mut self, len: usize) {
        if let Some(record) = &mut self.record {
            record.on_data(len);
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(record) = &mut self.record {
            record.outcome = outcome;
        }
        // Dropping the record writes it now rather than whenever hyper drops the body.
        self.record = None;
        self.source = Source::Done;
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.source {
            Source::Full(bytes) => match bytes.take() {
                Some(bytes) => {
                    this.on_data(bytes.len());
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                None => {
                    this.finish(Outcome::Complete);
                    Poll::Ready(None)
                }
            },
            Source::Upstream { body, event_stream } => {
                let event_stream = *event_stream;
                match ready!(Pin::new(body).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            this.on_data(data.len());
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(error)) => {
                        let reason = error.to_string();
                        this.finish(Outcome::UpstreamFailed);
                        if event_stream {
                            Poll::Ready(Some(Ok(Frame::data(stream_error_event(&reason)))))
                        } else {
                            Poll::Ready(Some(Err(error.into())))
                        }
                    }
                    None => {
                        this.finish(Outcome::Complete);
                        Poll::Ready(None)
                    }
                }
            }
            Source::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Full(bytes) => bytes.is_none(),
            Source::Upstream { body, .. } => body.is_end_stream(),
            Source::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Source::Upstream { body, .. } => body.size_hint(),
            Source::Full(None) | Source::Done => SizeHint::with_exact(0),
        }
    }
}

/// The SSE event that ends a stream the upstream broke: OpenAI SDKs raise on an `error` event,
/// while a stream that merely stops looks like a complete answer to them.
pub fn stream_error_event(reason: &str) -> Bytes {
    let event = serde_json::json!({
        "error": {
            "message": format!("upstream stream failed: {reason}"),
            "type": "upstream_error",
            "param": null,
            "code": "upstream_stream_error",
        }
    });
    Bytes::from(format!("\n\ndata: {event}\n\n"))
}

/// How a request ended, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running; if the record is dropped in this state, the client went away.
    Pending,
    Complete,
    UpstreamFailed,
}

/// One request's facts, for its access-log line and metrics. Written exactly once, on drop.
pub struct RequestRecord {
    pub started: Instant,
    pub request_id: String,
    pub method: http::Method,
    pub path: String,
    pub route: Arc<str>,
    pub requested_model: Option<String>,
    pub served_model: Option<String>,
    pub attempts: usize,
    pub status: u16,
    pub error: Option<&'static str>,
    first_byte: Option<Duration>,
    bytes: u64,
    outcome: Outcome,
}

impl RequestRecord {
    pub fn new(request_id: String, method: http::Method, path: String) -> RequestRecord {
        crate::metrics::request_started();
        RequestRecord {
            started: Instant::now(),
            request_id,
            method,
            path,
            route: Arc::from(crate::router::DEFAULT_ROUTE),
            requested_model: None,
            served_model: None,
            attempts: 0,
            status: 0,
            error: None,
            first_byte: None,
            bytes: 0,
            outcome: Outcome::Pending,
        }
    }

    fn on_data(&mut self, len: usize) {
        if self.first_byte.is_none() && len > 0 {
            self.first_byte = Some(self.started.elapsed());
        }
        self.bytes += len as u64;
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        // 499: the client closed the connection before the answer was complete (nginx's convention).
        let status = match self.outcome {
            Outcome::Pending => 499,
            _ => self.status,
        };
        let outcome = match self.outcome {
            Outcome::Pending => "client_closed",
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
        };
        let model = self
            .served_model
            .as_deref()
            .or(self.requested_model.as_deref())
            .unwrap_or("");
        crate::metrics::request_finished(&self.route, model, status, duration, self.first_byte);
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            route = %self.route,
            requested_model = self.requested_model.as_deref().unwrap_or(""),
            served_model = self.served_model.as_deref().unwrap_or(""),
            attempts = self.attempts,
            status,
            upstream_status = self.status,
            outcome,
            error = self.error.unwrap_or(""),
            ttfb_ms = self.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            duration_ms = duration.as_secs_f64() * 1000.0,
            bytes = self.bytes,
            "request"
        );
    }
}
