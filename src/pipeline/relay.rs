//! The response body handed to the client: an upstream body relayed frame by frame as it arrives
//! (with the SSE scanner looking on), or a complete body. A stream that breaks ends with an error
//! event in the client's API shape, or continues on the next model when the route asks for it.
//! The body also carries the request's record, written when the body ends or the client goes away.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::cache::StreamRecorder;
use crate::error::ProxyError;
use crate::record::{Outcome, RequestRecord};
use crate::shape::Shape;
use crate::sse::{Passed, Scanner, WholeEvents};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What polling the client's body gives.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// A continuation of a broken stream: the next upstream body and the model serving it.
pub type ResumeFuture = Pin<Box<dyn Future<Output = Option<(Incoming, String)>> + Send>>;

/// Starts the continuation of a broken stream given the answer text so far; `None` when no model
/// is left to continue on.
pub trait Resume: Send {
    fn resume(&mut self, partial: &str) -> Option<ResumeFuture>;
}

/// What the client receives as a response body.
pub struct ProxyBody {
    source: Source,
    /// An upstream answer that reports a failure although its status is a success (an error
    /// body): relayed as it came, never stored for a repeat.
    failure: bool,
    record: Option<Box<RequestRecord>>,
    /// Concurrency slots held until the answer ends.
    permits: Vec<crate::limits::Permit>,
    /// Other things held until the answer ends (an endpoint's in-flight count).
    holds: Vec<Box<dyn std::any::Any + Send>>,
}

enum Source {
    Full(Option<Bytes>),
    Stream(Box<Relay>),
    Done,
}

/// An upstream body in flight.
pub struct Relay {
    /// Frames read while deciding whether to fall back; they go out first.
    held: VecDeque<Bytes>,
    body: Incoming,
    /// Present for event streams.
    scanner: Option<Scanner>,
    /// A requested stream must end with the event that completes it in its shape (`data: [DONE]`,
    /// `message_stop`, `response.completed`); ending without it is a truncation.
    expect_done: bool,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    resume: Option<Box<dyn Resume>>,
    resuming: Option<ResumeFuture>,
    /// While resuming is possible, only whole events are sent, so that a cut mid-event can be
    /// continued cleanly; this is the unfinished tail.
    tail: WholeEvents,
    /// Copies a cacheable stream until its `[DONE]`.
    recorder: Option<StreamRecorder>,
}

impl Relay {
    pub fn new(
        body: Incoming,
        held: VecDeque<Bytes>,
        scanner: Option<Scanner>,
        idle_timeout: Duration,
    ) -> Relay {
        Relay {
            held,
            body,
            scanner,
            expect_done: false,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            resume: None,
            resuming: None,
            tail: WholeEvents::default(),
            recorder: None,
        }
    }

    pub fn expect_done(mut self, expect: bool) -> Relay {
        self.expect_done = expect;
        self
    }

    pub fn with_resume(mut self, resume: Box<dyn Resume>) -> Relay {
        self.resume = Some(resume);
        self
    }

    /// How a stream that reached its end went: an error event on the way (which the client saw)
    /// makes it a failure.
    fn ended(&self) -> Outcome {
        match &self.scanner {
            Some(scanner) if scanner.errored => Outcome::UpstreamFailed,
            _ => Outcome::Complete,
        }
    }

    /// What of an upstream data frame goes out now: all of it, or, while the stream may still be
    /// resumed, the whole events it completes (`None` until one does).
    fn pass(&mut self, data: Bytes) -> Option<Bytes> {
        let Some(scanner) = &mut self.scanner else {
            return Some(data);
        };
        let boundary = scanner.feed(&data, |_| {});
        if let Some(recorder) = &mut self.recorder {
            recorder.push(&data);
        }
        if self.resume.is_none() {
            return Some(data);
        }
        match self.tail.pass(data, boundary) {
            Passed::Events(events) => Some(events),
            Passed::Held => None,
            // One event larger than the scanner's window is not held whole: it goes out as it
            // comes, and a break in it can no longer be resumed cleanly.
            Passed::Overlong(held) => {
                self.resume = None;
                Some(held)
            }
        }
    }

    /// The upstream body ended before the event that completes its stream.
    fn truncated(&self) -> bool {
        self.expect_done && self.scanner.as_ref().is_some_and(|scanner| !scanner.done)
    }
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody {
            source: Source::Full(Some(bytes)),
            failure: false,
            record: None,
            permits: Vec::new(),
            holds: Vec::new(),
        }
    }

    pub fn relay(relay: Relay) -> ProxyBody {
        ProxyBody {
            source: Source::Stream(Box::new(relay)),
            failure: false,
            record: None,
            permits: Vec::new(),
            holds: Vec::new(),
        }
    }

    /// Marks an answer that reports a failure (see [`ProxyBody::is_failure`]).
    pub fn failed(mut self) -> ProxyBody {
        self.failure = true;
        self
    }

    pub fn is_failure(&self) -> bool {
        self.failure
    }

    /// The whole body, when it is already complete in memory.
    pub fn complete_bytes(&self) -> Option<&Bytes> {
        match &self.source {
            Source::Full(Some(bytes)) => Some(bytes),
            _ => None,
        }
    }

    /// Copies a streamed answer for the cache as it is sent; it is stored if the stream completes.
    pub fn record_stream(&mut self, mut recorder: StreamRecorder) {
        if let Source::Stream(relay) = &mut self.source {
            if relay.scanner.is_some() {
                for held in &relay.held {
                    recorder.push(held);
                }
                relay.recorder = Some(recorder);
            }
        }
    }

    /// Keeps `held` until the answer ends.
    pub fn holding<T: std::any::Any + Send>(mut self, held: T) -> ProxyBody {
        self.holds.push(Box::new(held));
        self
    }

    pub fn with_permits(mut self, permits: Vec<crate::limits::Permit>) -> ProxyBody {
        self.permits = permits;
        self
    }

    /// Attaches the record that is finished when this body ends or is dropped.
    pub fn with_record(mut self, record: Box<RequestRecord>) -> ProxyBody {
        self.record = Some(record);
        self
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Source::Stream(relay) = &mut self.source {
            if let Some(recorder) = relay.recorder.take() {
                let complete = outcome == Outcome::Complete
                    && relay.resuming.is_none()
                    && relay.scanner.as_ref().is_some_and(|s| s.done && !s.errored);
                recorder.finish(complete);
            }
        }
        if let Some(record) = &mut self.record {
            record.outcome = outcome;
            if let Source::Stream(relay) = &self.source {
                if let Some(scanner) = &relay.scanner {
                    if let Some(usage) = scanner.usage {
                        record.usage = Some(usage);
                    }
                    if !scanner.text.is_empty() {
                        record.span.record_output(&scanner.text, "");
                    }
                }
            }
        }
        // What is held (the attempt's span among it) ends before the request's record and span.
        self.holds.clear();
        // Dropping the record writes it now rather than whenever hyper drops the body.
        self.record = None;
        self.permits.clear();
        self.source = Source::Done;
    }

    fn deliver(&mut self, bytes: Bytes) -> Polled {
        if let Some(record) = &mut self.record {
            record.on_data(&bytes);
            if matches!(self.source, Source::Full(_)) {
                record.span.record_output_json(&bytes);
            }
        }
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    /// Whether everything the client is to receive has been handed over, or there was nothing to
    /// hand over. hyper never polls a body it knows to be empty (`content-length: 0`), so such an
    /// answer is complete although its end was never polled.
    fn handed_over(&self) -> bool {
        match &self.source {
            Source::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Source::Stream(relay) => {
                relay.held.is_empty()
                    && relay.tail.is_empty()
                    && relay.resuming.is_none()
                    && relay.body.is_end_stream()
                    && !relay.truncated()
            }
            Source::Done => false,
        }
    }

    /// Waits for the continuation of a broken stream to answer; `Some` ends the body when no model
    /// could continue it.
    fn poll_resuming(&mut self, cx: &mut Context<'_>) -> Poll<Option<Polled>> {
        let Source::Stream(relay) = &mut self.source else {
            return Poll::Ready(None);
        };
        let Some(resuming) = &mut relay.resuming else {
            return Poll::Ready(None);
        };
        let resumed = ready!(resuming.as_mut().poll(cx));
        relay.resuming = None;
        let Some((body, model)) = resumed else {
            let event_stream = relay.scanner.as_ref().map(Scanner::shape);
            let reason = "the stream broke and no model could continue it";
            return Poll::Ready(Some(self.fail(reason, event_stream)));
        };
        relay.body = body;
        let next_deadline = tokio::time::Instant::now() + relay.idle_timeout;
        relay.idle.as_mut().reset(next_deadline);
        if let Some(record) = &mut self.record {
            record.served_model = Some(model);
            record.attempts += 1;
        }
        Poll::Ready(None)
    }

    /// The stream broke, stalled or ended early, after content may have reached the client: it
    /// ends, or continues on the next model (`None`: poll again), or fails with an error event.
    fn broke(&mut self, failure: &str) -> Option<Polled> {
        let Source::Stream(relay) = &mut self.source else {
            return Some(Poll::Ready(None));
        };
        let event_stream = relay.scanner.as_ref().map(Scanner::shape);
        // A complete stream is never followed by anything of the proxy's: whatever the
        // connection does after the completing event adds nothing to the answer.
        if relay.scanner.as_ref().is_some_and(|s| s.done) {
            let outcome = relay.ended();
            self.finish(outcome);
            return Some(Poll::Ready(None));
        }
        let continuation = match (&mut relay.resume, &relay.scanner) {
            (Some(resume), Some(scanner)) => resume.resume(&scanner.text),
            _ => None,
        };
        let Some(future) = continuation else {
            return Some(self.fail(failure, event_stream));
        };
        tracing::warn!(reason = %failure, "stream broke: resuming on the next model");
        relay.tail.clear();
        if let Some(scanner) = &mut relay.scanner {
            scanner.reset_partial();
        }
        relay.resuming = Some(future);
        None
    }

    /// Ends a broken stream: an error event in the stream's shape for event streams, an aborted
    /// body otherwise.
    fn fail(&mut self, reason: &str, event_stream: Option<Shape>) -> Polled {
        if let Some(record) = &mut self.record {
            record.stream_error = Some(reason.to_owned());
        }
        self.finish(Outcome::UpstreamFailed);
        match event_stream {
            Some(shape) => {
                self.deliver(ProxyError::StreamBroken(reason.to_owned()).stream_event(shape))
            }
            None => Poll::Ready(Some(Err(reason.to_owned().into()))),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if self.record.is_some() && self.handed_over() {
            self.finish(Outcome::Complete);
            return;
        }
        // A client that leaves mid-stream still used the tokens reported so far.
        if let (Some(record), Source::Stream(relay)) = (&mut self.record, &self.source) {
            if let Some(usage) = relay.scanner.as_ref().and_then(|s| s.usage) {
                record.usage = Some(usage);
            }
        }
        self.holds.clear();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        loop {
            let relay = match &mut this.source {
                Source::Full(bytes) => {
                    return match bytes.take() {
                        Some(bytes) => {
                            // hyper stops polling once `is_end_stream` says so, so the end is
                            // recorded with the only frame rather than on a poll that never comes.
                            let frame = this.deliver(bytes);
                            this.finish(Outcome::Complete);
                            frame
                        }
                        None => {
                            this.finish(Outcome::Complete);
                            Poll::Ready(None)
                        }
                    };
                }
                Source::Done => return Poll::Ready(None),
                Source::Stream(relay) => relay,
            };
            if let Some(bytes) = relay.held.pop_front() {
                return this.deliver(bytes);
            }
            let event_stream = relay.scanner.as_ref().map(Scanner::shape);

            if relay.resuming.is_some() {
                if let Some(end) = ready!(this.poll_resuming(cx)) {
                    return end;
                }
                continue;
            }

            let polled = Pin::new(&mut relay.body).poll_frame(cx);
            let failure = match polled {
                Poll::Pending => {
                    if relay.idle.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    format!(
                        "the upstream sent nothing for {}",
                        humantime::format_duration(relay.idle_timeout)
                    )
                }
                Poll::Ready(Some(Ok(frame))) => {
                    relay
                        .idle
                        .as_mut()
                        .reset(tokio::time::Instant::now() + relay.idle_timeout);
                    // Trailers are not relayed: the client's side is HTTP/1.1 or h2 without them.
                    if let Some(out) = frame.into_data().ok().and_then(|data| relay.pass(data)) {
                        return this.deliver(out);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(error))) => format!("the upstream connection broke: {error}"),
                Poll::Ready(None) => {
                    if !relay.truncated() {
                        if !relay.tail.is_empty() {
                            let rest = relay.tail.take();
                            return this.deliver(rest);
                        }
                        let outcome = relay.ended();
                        this.finish(outcome);
                        return Poll::Ready(None);
                    }
                    format!(
                        "the upstream closed the stream before {}",
                        completion_event(event_stream)
                    )
                }
            };
            if let Some(end) = this.broke(&failure) {
                return end;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Full(bytes) => bytes.is_none(),
            Source::Stream(_) => false,
            Source::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Source::Stream(relay) if relay.scanner.is_none() && relay.held.is_empty() => {
                relay.body.size_hint()
            }
            Source::Stream(_) => SizeHint::default(),
            Source::Full(None) | Source::Done => SizeHint::with_exact(0),
        }
    }
}

/// The event that completes a stream of `shape`, for messages about its absence.
fn completion_event(shape: Option<Shape>) -> &'static str {
    match shape {
        Some(Shape::Messages) => "message_stop",
        Some(Shape::Responses) => "response.completed",
        Some(Shape::Chat) | None => "[DONE]",
    }
}
