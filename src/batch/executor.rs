//! The contract between batch workers and the proxy's pipeline: a line goes in as a request
//! with no inbound connection, its answer (or the reason there is none) comes back.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

/// One input line, ready to run like a live request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRequest {
    /// The caller that owns the batch (the owner string given to [`super::BatchService::handle`]).
    pub owner: String,
    /// For the access log: every line's log entry names its batch.
    pub batch_id: String,
    pub custom_id: String,
    /// The batch's endpoint, e.g. `/v1/chat/completions` (a `POST`).
    pub path: String,
    /// The line's `body` as JSON, with `stream` and `stream_options` removed: lines are never
    /// streamed.
    pub body: Bytes,
}

/// What running a line gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineOutcome {
    /// An HTTP answer, whatever its status (the pipeline's own errors included: a 502 after every
    /// fallback failed is an answer).
    Answered(LineResponse),
    /// No answer at all (connection refused or reset, a timeout with no status): retried like a
    /// 5xx. The message is for logs and, after the last retry, the error file.
    Unreachable(String),
}

/// An HTTP answer to a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineResponse {
    pub status: u16,
    /// The whole answer body (JSON, as the endpoint returns it).
    pub body: Bytes,
    /// The upstream's request id (`x-request-id`), or one the pipeline made up; empty lets the
    /// batch make one.
    pub request_id: String,
    /// The upstream's `Retry-After`, when it sent one: it replaces the backoff delay.
    pub retry_after: Option<Duration>,
}

/// The future a [`LineExecutor`] returns.
pub type LineFuture = Pin<Box<dyn Future<Output = LineOutcome> + Send>>;

/// Runs lines through the same pipeline as live requests (routing, model rewrite, fallback,
/// cache, key pools, limits). Implemented by the proxy; tests implement it over plain HTTP.
///
/// The worker gives a line at most `[batch] claim_after` and then drops the future, so an
/// executor needs no timeout of its own beyond the pipeline's. A dropped future must cancel
/// whatever it had in flight.
pub trait LineExecutor: Send + Sync + 'static {
    fn execute(&self, line: LineRequest) -> LineFuture;
}
