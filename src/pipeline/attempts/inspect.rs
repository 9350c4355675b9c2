//! Reading the start of an upstream answer, in the request's API shape, to tell a failure another
//! model may make up for from an answer for the client: a stream's preamble held back until its
//! first content event, a JSON answer read whole within a bound, and what cannot be read
//! (compressed bytes, other content types) relayed untouched.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::resume::Continuation;
use super::send::{Failure, Reason};
use super::Outbound;
use crate::config::Midstream;
use crate::pipeline::relay::{ProxyBody, Relay};
use crate::record::RequestRecord;
use crate::shape::Shape;
use crate::sse::{Event, Scanner, WINDOW};

/// What is known of an answer when its head arrives.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    /// When the attempt was sent: the first-byte budget counts from here.
    pub(super) started: Instant,
    /// The position in the plan of the attempt serving.
    pub(super) serving: usize,
    /// The first-byte budget of the attempt.
    pub(super) timeout: Duration,
    /// How long the answer may stay silent once it flows.
    pub(super) idle: Duration,
    /// The answer's text is wanted on the trace span (`capture_content`).
    pub(super) capture: bool,
}

/// The body the client gets for an answer whose status is no failure in itself, or the failure
/// found in it.
pub(super) async fn body(
    out: &Outbound<'_>,
    answer: Answer,
    headers: &mut HeaderMap,
    body: Incoming,
    record: &mut RequestRecord,
) -> Result<ProxyBody, Failure> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let success = answer.status.is_success();
    // Compressed bytes cannot be read as events or JSON, and nothing may be added to them.
    if compressed(headers) {
        return Ok(untouched(&answer, body));
    }
    if success && content_type.starts_with("text/event-stream") {
        return stream(out, &answer, body).await;
    }
    // Anthropic's transient errors (overloaded, internal) are worth another model whatever their
    // status; other error statuses are the client's own answer.
    let transient_possible = out.inspect && out.shape == Shape::Messages;
    if content_type.starts_with("application/json") && (success || transient_possible) {
        return json(out, &answer, headers, body, record).await;
    }
    Ok(untouched(&answer, body))
}

fn untouched(answer: &Answer, body: Incoming) -> ProxyBody {
    let idle = answer.idle;
    ProxyBody::relay(Relay::new(body, VecDeque::new(), None, idle))
}

/// An event stream, held back until its first content when a fallback is possible.
async fn stream(out: &Outbound<'_>, answer: &Answer, body: Incoming) -> Result<ProxyBody, Failure> {
    let timeout = answer.timeout;
    // Resuming appends the partial answer as an assistant message: chat streams only.
    let resumable = out.route.on_midstream == Midstream::Resume
        && out.json.is_some()
        && out.shape == Shape::Chat;
    let mut scanner = Scanner::for_shape(out.shape, resumable || answer.capture);
    let (held, body) = if out.inspect {
        hold_until_content(body, &mut scanner, answer.started + timeout, timeout).await?
    } else {
        (VecDeque::new(), body)
    };
    // A requested stream promises the event that completes it in its shape.
    let expect_done = out.json.as_ref().is_some_and(|j| j.stream);
    let idle = answer.idle;
    let mut relay = Relay::new(body, held, Some(scanner), idle).expect_done(expect_done);
    if resumable {
        if let Some(continuation) = Continuation::new(out, answer.serving) {
            relay = relay.with_resume(Box::new(continuation));
        }
    }
    Ok(ProxyBody::relay(relay))
}

/// A JSON answer, read whole when it fits the inspection bound: an error in it falls back.
async fn json(
    out: &Outbound<'_>,
    answer: &Answer,
    headers: &mut HeaderMap,
    body: Incoming,
    record: &mut RequestRecord,
) -> Result<ProxyBody, Failure> {
    let timeout = answer.timeout;
    let limit = out.runtime.config.fallback.max_inspect_bytes;
    let deadline = answer.started + timeout;
    let bytes = match read_bounded(body, limit, deadline, timeout).await? {
        Bounded::Complete(bytes) => bytes,
        Bounded::TooLarge(held, body) => {
            return Ok(ProxyBody::relay(Relay::new(body, held, None, answer.idle)));
        }
    };
    let success = answer.status.is_success();
    let found = crate::sse::json_answer(out.shape, &bytes);
    let reported_failure = found.error.is_some();
    let failure = found.error.filter(|_| success || found.transient);
    if let (true, Some(message)) = (out.inspect, failure) {
        let mut failure = Failure::new(Reason::Unavailable, message);
        if !success {
            failure.reason = Reason::Status(answer.status.as_u16());
            failure.status = Some(answer.status);
        }
        return Err(failure);
    }
    if success {
        record.usage = found.usage;
    }
    headers.remove(header::CONTENT_LENGTH);
    let body = ProxyBody::full(bytes);
    Ok(if reported_failure {
        body.failed()
    } else {
        body
    })
}

/// Reads a streaming answer until its first content event, holding back what came before
/// (status, headers, keep-alive comments, the shape's preamble events), so that an error event in
/// its place can still fall back invisibly. The moment content shows up, everything held goes out.
async fn hold_until_content(
    mut body: Incoming,
    scanner: &mut Scanner,
    deadline: Instant,
    timeout: Duration,
) -> Result<(VecDeque<Bytes>, Incoming), Failure> {
    let mut held = VecDeque::new();
    let mut held_bytes = 0;
    loop {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame()).await;
        let frame = match frame {
            Err(_) => {
                let mut failure = Failure::new(
                    Reason::Timeout,
                    format!("no content within {}", humantime::format_duration(timeout)),
                );
                failure.timeout = timeout;
                return Err(failure);
            }
            Ok(None) if scanner.done => return Ok((held, body)),
            Ok(None) => {
                return Err(Failure::new(
                    Reason::StreamFailed,
                    "the stream ended before any content".into(),
                ));
            }
            Ok(Some(Err(error))) => {
                return Err(Failure::new(
                    Reason::StreamFailed,
                    format!("the stream broke before any content: {error}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        held_bytes += data.len();
        let mut verdict: Option<Result<(), String>> = None;
        scanner.feed(&data, |event| {
            if verdict.is_none() {
                match event {
                    Event::Error(message) => verdict = Some(Err(message)),
                    Event::Content | Event::Done => verdict = Some(Ok(())),
                    Event::KeepAlive => {}
                }
            }
        });
        held.push_back(data);
        match verdict {
            Some(Err(message)) => return Err(Failure::new(Reason::Unavailable, message)),
            Some(Ok(())) => return Ok((held, body)),
            // A preamble larger than the scanner's window is not an error event: it goes out.
            None if held_bytes > WINDOW => return Ok((held, body)),
            None => {}
        }
    }
}

enum Bounded {
    Complete(Bytes),
    /// Over the inspection limit: what was read so far, and the rest still to come.
    TooLarge(VecDeque<Bytes>, Incoming),
}

/// Reads a non-streaming answer whole when it fits in `limit`.
async fn read_bounded(
    mut body: Incoming,
    limit: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Bounded, Failure> {
    let mut held: VecDeque<Bytes> = VecDeque::new();
    let mut size = 0;
    loop {
        // The whole answer must arrive within the first-byte budget plus the idle allowance of a
        // stream; a stalled body is a failed attempt while nothing has reached the client.
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Ok(frame) => frame,
            Err(_) => match tokio::time::timeout(timeout, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    let mut failure = Failure::new(Reason::Timeout, "the answer stalled".into());
                    failure.timeout = timeout;
                    return Err(failure);
                }
            },
        };
        match frame {
            None => break,
            Some(Err(error)) => {
                return Err(Failure::new(
                    Reason::Transport,
                    format!("the answer broke off: {error}"),
                ));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    held.push_back(data);
                    if size > limit {
                        return Ok(Bounded::TooLarge(held, body));
                    }
                }
            }
        }
    }
    Ok(Bounded::Complete(match held.len() {
        0 => Bytes::new(),
        1 => held.pop_front().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(size);
            for part in held {
                joined.extend_from_slice(&part);
            }
            joined.freeze()
        }
    }))
}

/// Whether an answer comes in an encoding other than identity (the upstream is asked for identity,
/// but may answer otherwise).
pub(super) fn compressed(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"))
}
