//! What a sampled request's span reports of the answer (`gen_ai.response.id`, `.model` and
//! `.finish_reasons`), picked from the bytes going to the client as they pass: a search for the
//! JSON keys, no parse. The first `"id"` and `"model"` of an answer are its own in every shape
//! (a chat completion or chunk, Anthropic's `message_start`, the Responses API's
//! `response.created`); a key inside a string is escaped (`\"id\"`) and never matches. A key cut
//! across two frames is missed; upstreams write each event whole.

use memchr::memmem;

/// Distinct finish reasons kept; an answer has one per choice.
const MAX_REASONS: usize = 8;
/// Longest id, model or reason kept: these are identifiers, not text.
const MAX_VALUE: usize = 256;

/// The answer's facts found so far.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Facts {
    pub id: Option<String>,
    pub model: Option<String>,
    pub finish_reasons: Vec<String>,
}

impl Facts {
    /// Looks at the next bytes of the answer.
    pub fn scan(&mut self, bytes: &[u8]) {
        if self.id.is_none() {
            self.id = first_string(bytes, b"\"id\"");
        }
        if self.model.is_none() {
            self.model = first_string(bytes, b"\"model\"");
        }
        // OpenAI's `finish_reason`, Anthropic's `stop_reason`; `null` until the end.
        for key in [&b"\"finish_reason\""[..], b"\"stop_reason\""] {
            for at in memmem::find_iter(bytes, key) {
                let Some(reason) = string_after(&bytes[at + key.len()..]) else {
                    continue;
                };
                let known = self.finish_reasons.contains(&reason);
                if !known && self.finish_reasons.len() < MAX_REASONS {
                    self.finish_reasons.push(reason);
                }
            }
        }
    }
}

fn first_string(bytes: &[u8], key: &[u8]) -> Option<String> {
    memmem::find_iter(bytes, key).find_map(|at| string_after(&bytes[at + key.len()..]))
}

/// The string value after a key: `: "value"`, with optional blanks; `None` for any other value
/// (`null`, a number, an object), or one with escapes.
fn string_after(rest: &[u8]) -> Option<String> {
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] != b'"' || end == 0 || end > MAX_VALUE {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(parts: &[&str]) -> Facts {
        let mut facts = Facts::default();
        for part in parts {
            facts.scan(part.as_bytes());
        }
        facts
    }

    #[test]
    fn a_chat_stream() {
        let facts = scan(&[
            "data: {\"id\":\"gen-1\",\"provider\":\"P\",\"model\":\"openai/gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"say \\\"id\\\": \\\"x\\\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"gen-1\",\"model\":\"openai/gpt-4o\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"id\":\"gen-1\",\"choices\":[{\"finish_reason\":\"stop\"},{\"index\":1,\"finish_reason\":\"length\"}]}\n\n",
        ]);
        assert_eq!(facts.id.as_deref(), Some("gen-1"));
        assert_eq!(facts.model.as_deref(), Some("openai/gpt-4o"));
        assert_eq!(facts.finish_reasons, ["stop", "length"]);
    }

    #[test]
    fn a_pretty_printed_answer_and_anthropic_events() {
        let facts =
            scan(&["{\n  \"id\" : \"chatcmpl-9\",\n  \"model\": \"m\",\n  \"choices\": []\n}"]);
        assert_eq!(
            (facts.id.as_deref(), facts.model.as_deref()),
            (Some("chatcmpl-9"), Some("m"))
        );
        let facts = scan(&[
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"stop_reason\":null}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"}}\n\n",
        ]);
        assert_eq!(facts.id.as_deref(), Some("msg_1"));
        assert_eq!(facts.finish_reasons, ["end_turn"]);
    }

    #[test]
    fn values_that_are_not_plain_strings_are_skipped() {
        let facts = scan(&["{\"id\": 5, \"model\": \"a\\\"b\", \"x\": {\"id\": \"later\"}}"]);
        assert_eq!(facts.id.as_deref(), Some("later"));
        assert_eq!(facts.model, None);
        let long = format!("{{\"id\":\"{}\"}}", "x".repeat(MAX_VALUE + 1));
        assert_eq!(scan(&[&long]).id, None);
    }
}
