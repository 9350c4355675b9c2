//! What an attempt at a line comes to: succeeded, failed, or retried later with exponential
//! backoff and jitter; and the output and error file lines in OpenAI's JSONL format. Pure: the
//! time and the random fraction are arguments.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::executor::{LineOutcome, LineResponse};
use super::model::{millis, new_id};
use super::store::Settlement;

/// `[batch] retry_base` and `max_retries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max_retries: u32,
}

/// How long the `retry`-th retry (1-based) waits: between half of and the whole of
/// `base` x 2^(retry-1), placed in that range by `fraction` (in `[0, 1)`).
pub fn backoff(base: Duration, retry: u32, fraction: f64) -> Duration {
    let full = base.saturating_mul(1u32 << retry.saturating_sub(1).min(30));
    full.mul_f64(0.5 + 0.5 * fraction.clamp(0.0, 1.0))
}

/// An attempt as the worker saw it: the executor's outcome, or no outcome within the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done(LineOutcome),
    TimedOut,
}

/// The settlement of an attempt at a line that had `previous` attempts before, and the
/// `openrouter_batch_lines_total` status it counts as.
pub fn decide(
    attempt: &Attempt,
    custom_id: &str,
    previous: u32,
    policy: RetryPolicy,
    now_ms: u64,
    fraction: f64,
) -> (Settlement, &'static str) {
    let answered = match attempt {
        Attempt::Done(LineOutcome::Answered(response)) => Some(response),
        _ => None,
    };
    if let Some(response) = answered {
        if (200..300).contains(&response.status) {
            return (
                Settlement::Succeeded(response_line(custom_id, response)),
                "succeeded",
            );
        }
    }
    let retryable = answered.is_none_or(|r| r.status == 429 || r.status == 408 || r.status >= 500);
    if retryable && previous < policy.max_retries {
        let wait = answered
            .and_then(|r| r.retry_after)
            .unwrap_or_else(|| backoff(policy.base, previous + 1, fraction));
        return (
            Settlement::RetryAt(now_ms.saturating_add(millis(wait))),
            "retried",
        );
    }
    let line = match attempt {
        Attempt::Done(LineOutcome::Answered(response)) => response_line(custom_id, response),
        Attempt::Done(LineOutcome::Unreachable(message)) => {
            error_line(custom_id, "upstream_unreachable", message)
        }
        Attempt::TimedOut => error_line(
            custom_id,
            "timeout",
            "The request did not finish within the time a worker may hold a line.",
        ),
    };
    (Settlement::Failed(line), "failed")
}

#[derive(Serialize)]
struct OutputLine<'a> {
    id: String,
    custom_id: &'a str,
    response: Option<ResponsePart<'a>>,
    error: Option<ErrorPart<'a>>,
}

#[derive(Serialize)]
struct ResponsePart<'a> {
    status_code: u16,
    request_id: String,
    body: BodyPart<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BodyPart<'a> {
    Json(&'a RawValue),
    Text(String),
}

#[derive(Serialize)]
struct ErrorPart<'a> {
    code: &'a str,
    message: &'a str,
}

fn encode(line: &OutputLine<'_>) -> Bytes {
    // Serializing these plain structs cannot fail; an empty line would only be skipped.
    let mut out = serde_json::to_vec(line).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// An output (or error) file line carrying an HTTP answer. A body that is not JSON is kept as a
/// JSON string.
pub fn response_line(custom_id: &str, response: &LineResponse) -> Bytes {
    let body = match serde_json::from_slice::<&RawValue>(&response.body) {
        Ok(raw) => BodyPart::Json(raw),
        Err(_) => BodyPart::Text(String::from_utf8_lossy(&response.body).into_owned()),
    };
    let request_id = if response.request_id.is_empty() {
        new_id("req_")
    } else {
        response.request_id.clone()
    };
    encode(&OutputLine {
        id: new_id("batch_req_"),
        custom_id,
        response: Some(ResponsePart {
            status_code: response.status,
            request_id,
            body,
        }),
        error: None,
    })
}

/// An error file line for a line that got no HTTP answer (never sent, or unreachable).
pub fn error_line(custom_id: &str, code: &str, message: &str) -> Bytes {
    encode(&OutputLine {
        id: new_id("batch_req_"),
        custom_id,
        response: None,
        error: Some(ErrorPart { code, message }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_secs(2),
        max_retries: 3,
    };

    fn answer(status: u16, retry_after: Option<Duration>) -> Attempt {
        Attempt::Done(LineOutcome::Answered(LineResponse {
            status,
            body: Bytes::from_static(b"{\"ok\":1}"),
            request_id: "r1".to_owned(),
            retry_after,
        }))
    }

    #[test]
    fn backoff_doubles_within_half_and_whole() {
        let base = Duration::from_secs(2);
        assert_eq!(backoff(base, 1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(base, 1, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(base, 3, 0.0), Duration::from_secs(4));
        let near_whole = backoff(base, 3, 0.999_999);
        assert!(near_whole < Duration::from_secs(8) && near_whole > Duration::from_millis(7990));
    }

    /// The file line a settled attempt wrote, and the status it counted as.
    fn written(attempt: &Attempt) -> (serde_json::Value, &'static str) {
        match decide(attempt, "c1", 0, POLICY, 1000, 0.5) {
            (Settlement::Succeeded(line) | Settlement::Failed(line), status) => {
                assert!(line.ends_with(b"\n"), "one JSONL line");
                (serde_json::from_slice(&line).unwrap(), status)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn success_goes_to_the_output_file() {
        let (json, status) = written(&answer(200, None));
        assert_eq!(status, "succeeded");
        assert_eq!(json["custom_id"], "c1");
        assert_eq!(json["response"]["status_code"], 200);
        assert_eq!(json["response"]["request_id"], "r1");
        assert_eq!(json["response"]["body"]["ok"], 1);
        assert_eq!(json["error"], serde_json::Value::Null);
        assert!(json["id"].as_str().unwrap().starts_with("batch_req_"));
    }

    #[test]
    fn retryable_failures_wait_then_fail_after_the_last_retry() {
        for attempt in [
            answer(429, None),
            answer(503, None),
            Attempt::TimedOut,
            Attempt::Done(LineOutcome::Unreachable("refused".into())),
        ] {
            let (settlement, status) = decide(&attempt, "c", 1, POLICY, 1000, 0.0);
            // The second retry: 2s x 2 at the least jitter is 2s.
            assert_eq!((settlement, status), (Settlement::RetryAt(3000), "retried"));
            let (settlement, status) = decide(&attempt, "c", 3, POLICY, 1000, 0.0);
            assert!(matches!(settlement, Settlement::Failed(_)), "{attempt:?}");
            assert_eq!(status, "failed");
        }
    }

    #[test]
    fn retry_after_replaces_the_backoff() {
        let attempt = answer(429, Some(Duration::from_secs(30)));
        let (settlement, _) = decide(&attempt, "c", 0, POLICY, 1000, 0.0);
        assert_eq!(settlement, Settlement::RetryAt(31_000));
    }

    #[test]
    fn a_client_error_fails_at_once_with_its_answer() {
        let (json, status) = written(&answer(400, None));
        assert_eq!(status, "failed");
        assert_eq!(json["response"]["status_code"], 400);
    }

    #[test]
    fn no_answer_is_reported_as_an_error() {
        let line = error_line("c", "batch_expired", "too late");
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(json["response"], serde_json::Value::Null);
        assert_eq!(json["error"]["code"], "batch_expired");
        let body = LineResponse {
            status: 502,
            body: Bytes::from_static(b"<html>"),
            request_id: String::new(),
            retry_after: None,
        };
        let json: serde_json::Value = serde_json::from_slice(&response_line("c", &body)).unwrap();
        assert_eq!(json["response"]["body"], "<html>");
        assert!(!json["response"]["request_id"].as_str().unwrap().is_empty());
    }
}
