//! The OpenAI chat and text completion shape: every `data:` event is a JSON chunk (`event:` names
//! are ignored); an `error` object or a choice finished with `finish_reason: "error"` is an error,
//! `usage` comes in a late chunk, and `data: [DONE]` completes the stream.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{error_message, Event, JsonAnswer, ReportedUsage, Scanner};

const FINISHED_WITH_ERROR: &str = "the provider finished the answer with an error";

pub(super) fn classify(scanner: &mut Scanner, data: &[u8], whole: bool) -> Event {
    // Errors and usage are small: an event too large to read is content passing through.
    if !whole {
        return Event::Content;
    }
    // Once content flows, most events are plain deltas: skip parsing those unless they can
    // carry what the proxy needs.
    let may_matter =
        scanner.collect_text || !scanner.seen_content || super::names_usage_or_error(data);
    if !may_matter {
        return Event::Content;
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else {
        // Not JSON: not ours to judge; it passes through as content.
        return Event::Content;
    };
    if let Some(error) = chunk.error.filter(|e| e.get() != "null") {
        return Event::Error(error_message(error));
    }
    if let Some(usage) = &chunk.usage {
        usage.replace(&mut scanner.usage);
    }
    for choice in &chunk.choices {
        if choice.finished_with_error() {
            return Event::Error(FINISHED_WITH_ERROR.to_owned());
        }
        if scanner.collect_text {
            if let Some(content) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                scanner.text.push_str(content);
            }
        }
    }
    Event::Content
}

/// A complete chat answer: a top-level `error`, a choice finished with an error, `usage`.
pub(super) fn json_answer(body: &[u8]) -> JsonAnswer {
    let Ok(top) = serde_json::from_slice::<Chunk<'_>>(body) else {
        return JsonAnswer::default();
    };
    let finished_with_error = || {
        top.choices
            .iter()
            .any(Choice::finished_with_error)
            .then(|| FINISHED_WITH_ERROR.to_owned())
    };
    let mut usage = None;
    if let Some(reported) = &top.usage {
        reported.replace(&mut usage);
    }
    JsonAnswer {
        error: top
            .error
            .filter(|e| e.get() != "null")
            .map(error_message)
            .or_else(finished_with_error),
        transient: false,
        usage,
    }
}

/// A stream chunk, or a whole answer (whose choices carry `message` instead of `delta`).
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<ReportedUsage>,
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

impl Choice {
    fn finished_with_error(&self) -> bool {
        self.finish_reason.as_deref() == Some("error")
    }
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::super::tests::every_split_gives_the_same;
    use super::super::{json_answer, json_body_error, Shape, Usage};
    use super::*;

    const STREAM: &str = ": OPENROUTER PROCESSING\n\n\
        data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\r\n\r\n\
        : keep-alive\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"cost\":0.5}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn events_usage_and_text_however_split() {
        let (events, scanner) = every_split_gives_the_same(Shape::Chat, STREAM.as_bytes());
        assert_eq!(
            events,
            vec![
                Event::KeepAlive,
                Event::Content,
                Event::Content,
                Event::KeepAlive,
                Event::Content,
                Event::Done
            ]
        );
        assert_eq!(scanner.text, "Hello");
        assert_eq!(
            scanner.usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cost: Some(0.5)
            })
        );
        assert!(scanner.done && !scanner.errored && scanner.at_boundary());
    }

    #[test]
    fn errors_before_content() {
        let input = b": OPENROUTER PROCESSING\n\ndata: {\"error\":{\"message\":\"No endpoints\",\"code\":503}}\n\n";
        let (events, scanner) = every_split_gives_the_same(Shape::Chat, input);
        assert_eq!(events[1], Event::Error("No endpoints".into()));
        // A chat stream is not over at an error: OpenRouter may still send `[DONE]`.
        assert!(scanner.errored && !scanner.done);
        let input =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}\n\n";
        let (events, _) = every_split_gives_the_same(Shape::Chat, input);
        assert!(matches!(events[0], Event::Error(_)));
    }

    #[test]
    fn json_bodies() {
        assert_eq!(
            json_body_error(br#"{"error":{"message":"down","code":502}}"#),
            Some("down".into())
        );
        assert_eq!(json_body_error(br#"{"error":null,"choices":[]}"#), None);
        assert_eq!(json_body_error(br#"{"choices":[]}"#), None);
        assert_eq!(
            json_body_error(br#"{"choices":[{"message":{},"finish_reason":"error"}]}"#),
            Some(FINISHED_WITH_ERROR.into())
        );
        assert_eq!(
            json_body_error(
                br#"{"choices":[{"message":{"content":"error"},"finish_reason":"stop"}]}"#
            ),
            None
        );
        assert_eq!(
            json_answer(
                Shape::Chat,
                br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#
            )
            .usage,
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                cost: None
            })
        );
    }
}
