//! The Anthropic Messages shape: named events (by their `event:` line, else their data's `type`).
//! Content starts at the first `content_block_delta`; what comes before it is preamble, held while
//! a fallback is still possible. `message_start` and `message_delta` report usage (output tokens
//! again each time: the last value is the total), `error` is an error that ends the stream, and
//! `message_stop` completes it. A complete answer is a message, or `{"type": "error", ...}`.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{error_message, Event, JsonAnswer, ReportedUsage, Scanner};

pub(super) fn classify(scanner: &mut Scanner, kind: &[u8], data: &[u8], whole: bool) -> Event {
    match kind {
        b"content_block_start" | b"content_block_stop" | b"ping" => Event::KeepAlive,
        b"message_start" | b"message_delta" => {
            if whole {
                if let Ok(event) = serde_json::from_slice::<UsageEvent>(data) {
                    let reported = event.message.and_then(|m| m.usage).or(event.usage);
                    if let Some(reported) = reported {
                        reported.update(&mut scanner.usage);
                    }
                }
            }
            Event::KeepAlive
        }
        b"message_stop" => Event::Done,
        b"error" => {
            let failure = whole.then(|| failure(data)).flatten();
            Event::Error(failure.map_or_else(|| "error event".to_owned(), |f| f.describe()))
        }
        // `content_block_delta`, and whatever a newer API version adds: never held back.
        _ => Event::Content,
    }
}

/// A complete answer: a message with its usage, or an error object, even with status 200.
pub(super) fn json_answer(body: &[u8]) -> JsonAnswer {
    #[derive(Deserialize)]
    struct Top {
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        usage: Option<ReportedUsage>,
    }
    let Ok(top) = serde_json::from_slice::<Top>(body) else {
        return JsonAnswer::default();
    };
    if top.kind.as_deref() == Some("error") {
        let failure = failure(body);
        return JsonAnswer {
            transient: failure.as_ref().is_some_and(Failure::transient),
            error: Some(failure.map_or_else(|| "error answer".to_owned(), |f| f.describe())),
            usage: None,
        };
    }
    let mut usage = None;
    if let Some(reported) = &top.usage {
        reported.update(&mut usage);
    }
    JsonAnswer {
        usage,
        ..JsonAnswer::default()
    }
}

#[derive(Deserialize)]
struct UsageEvent {
    /// `message_start` carries the message, with its usage so far.
    #[serde(default)]
    message: Option<StartedMessage>,
    /// `message_delta` carries the usage itself.
    #[serde(default)]
    usage: Option<ReportedUsage>,
}

#[derive(Deserialize)]
struct StartedMessage {
    #[serde(default)]
    usage: Option<ReportedUsage>,
}

/// The `error` of `{"type": "error", "error": {"type", "message"}}`.
struct Failure {
    kind: String,
    message: String,
}

impl Failure {
    /// The provider was overloaded or failed internally: another model may answer.
    fn transient(&self) -> bool {
        matches!(self.kind.as_str(), "overloaded_error" | "api_error")
    }

    fn describe(&self) -> String {
        format!("{}: {}", self.kind, self.message)
    }
}

fn failure(body: &[u8]) -> Option<Failure> {
    #[derive(Deserialize)]
    struct Wrapper<'a> {
        #[serde(borrow)]
        error: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type", default)]
        kind: String,
    }
    let error = serde_json::from_slice::<Wrapper<'_>>(body).ok()?.error;
    let kind = serde_json::from_str::<Kind>(error.get()).map_or_else(|_| String::new(), |k| k.kind);
    Some(Failure {
        kind,
        message: error_message(error),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::every_split_gives_the_same;
    use super::super::{json_answer, Shape, Usage};
    use super::*;

    /// As Anthropic documents a streamed message, with OpenRouter's cost in the last usage.
    const STREAM: &str = "event: message_start\n\
        data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"anthropic/claude-sonnet-4\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n\
        event: content_block_start\n\
        data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
        event: ping\n\
        data: {\"type\": \"ping\"}\n\n\
        event: content_block_delta\n\
        data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
        event: content_block_delta\r\n\
        data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\r\n\r\n\
        event: content_block_stop\n\
        data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
        event: message_delta\n\
        data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15,\"cost\":0.0021}}\n\n\
        event: message_stop\n\
        data: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn a_recorded_stream_however_split() {
        let (events, scanner) = every_split_gives_the_same(Shape::Messages, STREAM.as_bytes());
        use Event::{Content, Done, KeepAlive};
        let expected = [
            KeepAlive, KeepAlive, KeepAlive, Content, Content, KeepAlive, KeepAlive, Done,
        ];
        assert_eq!(events, expected);
        assert!(scanner.done && !scanner.errored && scanner.at_boundary());
        assert_eq!(
            scanner.usage,
            Some(Usage {
                prompt_tokens: 30,
                completion_tokens: 15,
                cost: Some(0.0021)
            })
        );
    }

    #[test]
    fn an_error_event_ends_the_stream() {
        let input = "event: message_start\n\
            data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
            event: error\n\
            data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let (events, scanner) = every_split_gives_the_same(Shape::Messages, input.as_bytes());
        assert_eq!(
            events,
            [
                Event::KeepAlive,
                Event::Error("overloaded_error: Overloaded".into())
            ]
        );
        assert!(scanner.errored && scanner.done && !scanner.seen_content());
    }

    /// Without `event:` lines the data's `type` names the event.
    #[test]
    fn unnamed_events_are_read_by_their_type() {
        let input = "data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"a\"}}\n\n\
                     data: {\"type\":\"message_stop\"}\n\n";
        let (events, _) = every_split_gives_the_same(Shape::Messages, input.as_bytes());
        assert_eq!(events, [Event::Content, Event::Done]);
    }

    #[test]
    fn json_answers() {
        let message = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"error"}],"usage":{"input_tokens":4,"output_tokens":2,"cost":0.5}}"#;
        assert_eq!(
            json_answer(Shape::Messages, message),
            JsonAnswer {
                usage: Some(Usage {
                    prompt_tokens: 4,
                    completion_tokens: 2,
                    cost: Some(0.5)
                }),
                ..JsonAnswer::default()
            }
        );
        let overloaded =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let answer = json_answer(Shape::Messages, overloaded);
        assert_eq!(
            answer.error.as_deref(),
            Some("overloaded_error: Overloaded")
        );
        assert!(answer.transient);
        let invalid =
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"no"}}"#;
        let answer = json_answer(Shape::Messages, invalid);
        assert!(answer.error.is_some() && !answer.transient);
    }
}
