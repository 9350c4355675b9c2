//! Incremental scanning of a server-sent-events stream as it passes through: which events carry
//! content, errors, usage and `[DONE]`. The bytes themselves are never changed; the scanner only
//! looks, and after the first content event it parses only events that can carry usage or errors.

use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;

/// What one complete event meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A comment (`: OPENROUTER PROCESSING`) or an event without data: keeps the stream alive.
    KeepAlive,
    /// A data event carrying model output (or anything else that is not an error).
    Content,
    /// An `error` object, or a choice finished with `finish_reason: "error"`.
    Error(String),
    /// `data: [DONE]`.
    Done,
}

/// Token counts and cost from a `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// OpenRouter reports the cost in credits (USD) when usage accounting is on.
    #[serde(default)]
    pub cost: Option<f64>,
}

/// Feeds on the raw bytes of a stream, chunk by chunk, however they are split.
#[derive(Debug, Default)]
pub struct Scanner {
    /// The unfinished line carried over from the previous chunk.
    line: Vec<u8>,
    /// `data:` payloads of the event being read, joined by `\n`.
    data: Vec<u8>,
    has_data: bool,
    has_comment: bool,
    /// A chunk ended in `\r`: a `\n` starting the next chunk belongs to the same line break.
    after_cr: bool,
    /// A line of the current event has been read (any field, not only `data:` or a comment):
    /// the event is not over until its blank line.
    in_event: bool,
    seen_content: bool,
    /// Collect the text of `choices[0].delta.content` (needed to resume a broken stream).
    collect_text: bool,
    pub text: String,
    pub usage: Option<Usage>,
    pub done: bool,
    /// An error event went by (an answer that is not complete, whatever follows).
    pub errored: bool,
}

impl Scanner {
    pub fn new(collect_text: bool) -> Scanner {
        Scanner {
            collect_text,
            ..Scanner::default()
        }
    }

    /// True once a content event has been seen.
    pub fn seen_content(&self) -> bool {
        self.seen_content
    }

    /// Forgets an unfinished event (the stream it came from is gone), keeping the answer text,
    /// usage and whether content was seen.
    pub fn reset_partial(&mut self) {
        self.line.clear();
        self.data.clear();
        self.has_data = false;
        self.has_comment = false;
        self.after_cr = false;
        self.in_event = false;
        self.done = false;
    }

    /// True when the bytes so far end exactly at an event boundary.
    pub fn at_boundary(&self) -> bool {
        self.line.is_empty() && !self.in_event
    }

    /// Scans `chunk`, calling `on_event` for each event it completes. Returns the offset just
    /// past the last event that ended in this chunk, if any did.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Event)) -> Option<usize> {
        let mut pos = 0;
        let mut boundary = None;
        // An empty chunk changes nothing, not even a pending `\r`.
        if chunk.is_empty() {
            return None;
        }
        if self.after_cr {
            self.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                pos = 1;
                if self.at_boundary() {
                    boundary = Some(1);
                }
            }
        }
        while let Some(found) = memchr::memchr2(b'\n', b'\r', &chunk[pos..]) {
            let end = pos + found;
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let ended_event = if self.line.is_empty() {
                self.line_done(&chunk[pos..end], &mut on_event)
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[pos..end]);
                let ended = self.line_done(&line, &mut on_event);
                line.clear();
                self.line = line;
                ended
            };
            if ended_event {
                boundary = Some(next);
            }
            pos = next;
        }
        self.line.extend_from_slice(&chunk[pos..]);
        boundary
    }

    /// Handles one line; true when it was the blank line that ends an event.
    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(Event)) -> bool {
        if line.is_empty() {
            if let Some(event) = self.dispatch() {
                on_event(event);
            }
            return true;
        }
        self.in_event = true;
        if line[0] == b':' {
            self.has_comment = true;
        } else if let Some(value) = field(line, b"data") {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        // `event:`, `id:` and `retry:` lines do not matter to the proxy.
        false
    }

    fn dispatch(&mut self) -> Option<Event> {
        self.in_event = false;
        let had_comment = std::mem::take(&mut self.has_comment);
        if !std::mem::take(&mut self.has_data) {
            return had_comment.then_some(Event::KeepAlive);
        }
        let data = std::mem::take(&mut self.data);
        let event = self.classify(&data);
        self.data = data;
        self.data.clear();
        match event {
            Event::Content => self.seen_content = true,
            Event::Error(_) => self.errored = true,
            Event::KeepAlive | Event::Done => {}
        }
        Some(event)
    }

    fn classify(&mut self, data: &[u8]) -> Event {
        if data == b"[DONE]" {
            self.done = true;
            return Event::Done;
        }
        // Once content flows, most events are plain deltas: skip parsing those unless they can
        // carry what the proxy needs.
        let may_matter = self.collect_text
            || !self.seen_content
            || memmem::find(data, b"\"usage\"").is_some()
            || memmem::find(data, b"\"error\"").is_some();
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
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        for choice in &chunk.choices {
            if choice.finished_with_error() {
                return Event::Error(FINISHED_WITH_ERROR.to_owned());
            }
            if self.collect_text {
                if let Some(content) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                    self.text.push_str(content);
                }
            }
        }
        Event::Content
    }
}

fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some(rest);
    }
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<Usage>,
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

const FINISHED_WITH_ERROR: &str = "the provider finished the answer with an error";

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// The `message` of an error object, or its JSON when it has none.
pub fn error_message(error: &RawValue) -> String {
    #[derive(Deserialize)]
    struct WithMessage {
        message: String,
    }
    match serde_json::from_str::<WithMessage>(error.get()) {
        Ok(error) => error.message,
        Err(_) => error.get().chars().take(500).collect(),
    }
}

/// What the proxy needs from a complete JSON answer, read in one pass.
#[derive(Debug, Default, PartialEq)]
pub struct JsonAnswer {
    /// The message of a top-level `error` ("unavailable" answers that OpenRouter sends with
    /// status 200), or of a choice finished with `finish_reason: "error"`, as in a stream.
    pub error: Option<String>,
    pub usage: Option<Usage>,
}

/// Reads the top-level `error`, the choices' `finish_reason` and `usage` of a JSON answer. A body
/// that mentions neither `"error"` nor `"usage"` is not parsed at all.
pub fn json_answer(body: &[u8]) -> JsonAnswer {
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        error: Option<&'a RawValue>,
        #[serde(default)]
        usage: Option<Usage>,
        #[serde(default)]
        choices: Vec<Choice>,
    }
    if memmem::find(body, b"\"error\"").is_none() && memmem::find(body, b"\"usage\"").is_none() {
        return JsonAnswer::default();
    }
    match serde_json::from_slice::<Top<'_>>(body) {
        Ok(top) => JsonAnswer {
            error: top.error.filter(|e| e.get() != "null").map(error_message).or_else(|| {
                top.choices
                    .iter()
                    .any(Choice::finished_with_error)
                    .then(|| FINISHED_WITH_ERROR.to_owned())
            }),
            usage: top.usage,
        },
        Err(_) => JsonAnswer::default(),
    }
}

/// The top-level `error` of a complete JSON body, if it has one.
pub fn json_body_error(body: &[u8]) -> Option<String> {
    json_answer(body).error
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": OPENROUTER PROCESSING\n\n\
        data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\r\n\r\n\
        : keep-alive\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"cost\":0.5}}\n\n\
        data: [DONE]\n\n";

    fn scan_split(input: &[u8], split: &[usize]) -> (Vec<Event>, Scanner) {
        let mut scanner = Scanner::new(true);
        let mut events = Vec::new();
        let mut start = 0;
        for &end in split.iter().chain(std::iter::once(&input.len())) {
            let boundary = scanner.feed(&input[start..end], |e| events.push(e));
            if let Some(offset) = boundary {
                let absolute = start + offset;
                assert!(matches!(input[absolute - 1], b'\n' | b'\r'), "{absolute}");
            }
            start = end;
        }
        (events, scanner)
    }

    #[test]
    fn events_usage_and_text() {
        let (events, scanner) = scan_split(STREAM.as_bytes(), &[]);
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
        assert!(scanner.done && scanner.at_boundary());
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let input = STREAM.as_bytes();
        let (whole, _) = scan_split(input, &[]);
        for a in 0..input.len() {
            let (events, scanner) = scan_split(input, &[a]);
            assert_eq!(events, whole, "split at {a}");
            assert_eq!(scanner.text, "Hello");
        }
        let every_byte: Vec<usize> = (1..input.len()).collect();
        assert_eq!(scan_split(input, &every_byte).0, whole);
    }

    #[test]
    fn errors_before_content() {
        let input = b": OPENROUTER PROCESSING\n\ndata: {\"error\":{\"message\":\"No endpoints\",\"code\":503}}\n\n";
        let (events, _) = scan_split(input, &[]);
        assert_eq!(events[1], Event::Error("No endpoints".into()));
        let input =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}\n\n";
        assert!(matches!(scan_split(input, &[]).0[0], Event::Error(_)));
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
            json_body_error(br#"{"choices":[{"message":{"content":"error"},"finish_reason":"stop"}]}"#),
            None
        );
        assert_eq!(
            json_answer(br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#).usage,
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                cost: None
            })
        );
    }
}
