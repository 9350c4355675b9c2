//! The OpenAI Responses shape: named events (by their `event:` line, else their data's `type`).
//! `response.created`, `response.queued` and `response.in_progress` are preamble; content starts
//! at `response.output_item.added`. `response.failed` and `error` are errors that end the stream;
//! `response.completed` (or `response.incomplete`, a complete answer cut short by a limit)
//! completes it and carries the usage. A complete answer is a response object.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{error_message, Event, JsonAnswer, ReportedUsage, Scanner};

pub(super) fn classify(scanner: &mut Scanner, kind: &[u8], data: &[u8], whole: bool) -> Event {
    match kind {
        b"response.created" | b"response.queued" | b"response.in_progress" => Event::KeepAlive,
        b"response.completed" | b"response.incomplete" => {
            if let Some(response) = whole.then(|| lifecycle(data)).flatten() {
                if let Some(reported) = &response.usage {
                    reported.update(&mut scanner.usage);
                }
            }
            Event::Done
        }
        b"response.failed" => {
            let response = whole.then(|| lifecycle(data)).flatten();
            if let Some(reported) = response.as_ref().and_then(|r| r.usage.as_ref()) {
                reported.update(&mut scanner.usage);
            }
            Event::Error(response.map_or_else(|| FAILED.to_owned(), |r| r.failure()))
        }
        b"error" => Event::Error(match serde_json::from_slice::<&RawValue>(data) {
            Ok(event) if whole => error_message(event),
            _ => "error event".to_owned(),
        }),
        _ => Event::Content,
    }
}

/// A complete answer: a response object, failed or not.
pub(super) fn json_answer(body: &[u8]) -> JsonAnswer {
    let Ok(response) = serde_json::from_slice::<Response<'_>>(body) else {
        return JsonAnswer::default();
    };
    let failed = response.error.is_some_and(|e| e.get() != "null")
        || response.status.as_deref() == Some("failed");
    let mut usage = None;
    if let Some(reported) = &response.usage {
        reported.update(&mut usage);
    }
    JsonAnswer {
        error: failed.then(|| response.failure()),
        transient: false,
        usage,
    }
}

const FAILED: &str = "the response failed";

/// A response object: the body of a complete answer, and the `response` of lifecycle events.
#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    usage: Option<ReportedUsage>,
}

impl Response<'_> {
    fn failure(&self) -> String {
        match self.error.filter(|e| e.get() != "null") {
            Some(error) => error_message(error),
            None => FAILED.to_owned(),
        }
    }
}

/// The `response` of a lifecycle event.
fn lifecycle(data: &[u8]) -> Option<Response<'_>> {
    #[derive(Deserialize)]
    struct Lifecycle<'a> {
        #[serde(borrow)]
        response: Response<'a>,
    }
    serde_json::from_slice::<Lifecycle<'_>>(data)
        .ok()
        .map(|l| l.response)
}

#[cfg(test)]
mod tests {
    use super::super::tests::every_split_gives_the_same;
    use super::super::{json_answer, Shape, Usage};
    use super::*;

    fn event(kind: &str, body: &str) -> String {
        format!("event: {kind}\ndata: {{\"type\":\"{kind}\",{body}}}\n\n")
    }

    /// As OpenAI documents a streamed response, with OpenRouter's cost and its trailing `[DONE]`.
    fn recorded() -> String {
        let response = |status: &str, usage: &str| {
            format!(
                "\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"{status}\",\
                 \"model\":\"openai/gpt-4o\",\"output\":[],\"error\":null,\"usage\":{usage}}}"
            )
        };
        let item = "\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0";
        [
            event("response.created", &response("in_progress", "null")),
            event("response.in_progress", &response("in_progress", "null")),
            event(
                "response.output_item.added",
                "\"output_index\":0,\"item\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[]}",
            ),
            event("response.output_text.delta", &format!("{item},\"delta\":\"Hi\"")),
            event("response.output_text.done", &format!("{item},\"text\":\"Hi\"")),
            event(
                "response.completed",
                &response(
                    "completed",
                    "{\"input_tokens\":9,\"output_tokens\":2,\"total_tokens\":11,\"cost\":0.001}",
                ),
            ),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat()
    }

    #[test]
    fn a_recorded_stream_however_split() {
        let input = recorded();
        let (events, scanner) = every_split_gives_the_same(Shape::Responses, input.as_bytes());
        use Event::{Content, Done, KeepAlive};
        assert_eq!(
            events,
            [KeepAlive, KeepAlive, Content, Content, Content, Done, Done]
        );
        assert!(scanner.done && !scanner.errored);
        assert_eq!(
            scanner.usage,
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 2,
                cost: Some(0.001)
            })
        );
    }

    #[test]
    fn failures_end_the_stream() {
        let failed = event(
            "response.failed",
            "\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}",
        );
        let (events, scanner) = every_split_gives_the_same(Shape::Responses, failed.as_bytes());
        assert_eq!(events, [Event::Error("boom".into())]);
        assert!(scanner.errored && scanner.done);
        let error = "data: {\"type\":\"error\",\"code\":\"rate_limit_exceeded\",\"message\":\"slow down\"}\n\n";
        let (events, _) = every_split_gives_the_same(Shape::Responses, error.as_bytes());
        assert_eq!(events, [Event::Error("slow down".into())]);
    }

    #[test]
    fn json_answers() {
        let done = br#"{"id":"resp_1","object":"response","status":"completed","error":null,"usage":{"input_tokens":3,"output_tokens":4}}"#;
        let answer = json_answer(Shape::Responses, done);
        assert_eq!(answer.error, None);
        assert_eq!(
            answer.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cost: None
            })
        );
        let failed = br#"{"id":"resp_1","status":"failed","error":{"code":"server_error","message":"down"}}"#;
        assert_eq!(
            json_answer(Shape::Responses, failed).error.as_deref(),
            Some("down")
        );
    }
}
