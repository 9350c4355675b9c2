//! Incremental scanning of a server-sent-events stream as it passes through, in the request's API
//! shape: which events carry content, errors and usage, and which event completes the stream.
//! This module frames bytes into events within a bounded window; one table per shape (`chat`,
//! `messages`, `responses`) says what its events mean, in streams and in complete JSON answers.
//! The bytes themselves are never changed: the scanner only looks.

mod chat;
mod messages;
mod responses;
mod whole;

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::shape::Shape;
pub use whole::{Passed, WholeEvents};

/// Keys searched for in every answer and in many events: each searcher is built once.
static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static ERROR_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"error\""));
static TYPE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"type\""));

/// Whether `data` names a `"usage"` or an `"error"` key (or holds such a string).
fn names_usage_or_error(data: &[u8]) -> bool {
    USAGE_KEY.find(data).is_some() || ERROR_KEY.find(data).is_some()
}

/// The most of one line, or of one event's data, the scanner keeps to classify it. The events
/// that matter (usage, errors, the end of a stream, even a Responses API `response.completed`
/// that repeats the whole answer) are far smaller; the rest of a longer line passes by unread.
pub const WINDOW: usize = 4 << 20;

/// What is kept of a line or an event's data past the window: enough for the field name and the
/// `"type"` at the start of its JSON.
const HEAD: usize = 256;

/// A buffer that grew past this for one long line is given back once the line is read, so a
/// stream holds no more than it currently needs.
const KEEP_CAPACITY: usize = 64 << 10;

/// What one complete event meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A comment (`: OPENROUTER PROCESSING`), an event without data, or one the shape's table
    /// counts as preamble (Anthropic's `message_start`, the Responses API's `response.created`):
    /// the stream is alive, without content so far.
    KeepAlive,
    /// A data event carrying model output (or anything else that is not an error).
    Content,
    /// An error event, or a choice finished with `finish_reason: "error"`.
    Error(String),
    /// The event that completes the stream: `data: [DONE]`, `message_stop` or
    /// `response.completed`.
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

/// A `usage` object in any shape's spelling.
#[derive(Debug, Default, Deserialize)]
struct ReportedUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// Anthropic counts cached prompt tokens apart from `input_tokens`.
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cost: Option<f64>,
}

impl ReportedUsage {
    /// Writes the fields this report has over what was reported before: Anthropic reports output
    /// tokens again as the stream goes on, and the last value is the total.
    fn update(&self, usage: &mut Option<Usage>) {
        let usage = usage.get_or_insert_with(Usage::default);
        let input = self.input_tokens.map(|tokens| {
            tokens
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
        });
        if let Some(prompt) = self.prompt_tokens.or(input) {
            usage.prompt_tokens = prompt;
        }
        if let Some(completion) = self.completion_tokens.or(self.output_tokens) {
            usage.completion_tokens = completion;
        }
        if self.cost.is_some() {
            usage.cost = self.cost;
        }
    }

    /// Replaces what was reported before with this report alone.
    fn replace(&self, usage: &mut Option<Usage>) {
        *usage = None;
        self.update(usage);
    }
}

/// Feeds on the raw bytes of a stream, chunk by chunk, however they are split.
#[derive(Debug, Default)]
pub struct Scanner {
    shape: Shape,
    /// The unfinished line carried over from the previous chunk, at most [`WINDOW`] bytes.
    line: Vec<u8>,
    /// The line being read outgrew the window: its rest is skipped.
    skipping: bool,
    /// The `event:` name of the event being read.
    name: Vec<u8>,
    /// `data:` payloads of the event being read, joined by `\n`.
    data: Vec<u8>,
    /// The event's data outgrew the window: only its head is kept.
    data_overflowed: bool,
    has_data: bool,
    has_comment: bool,
    /// A chunk ended in `\r`: a `\n` starting the next chunk belongs to the same line break.
    after_cr: bool,
    /// A line of the current event has been read (any field, not only `data:` or a comment):
    /// the event is not over until its blank line.
    in_event: bool,
    seen_content: bool,
    /// Collect the text of `choices[0].delta.content` (needed to resume a broken chat stream).
    collect_text: bool,
    pub text: String,
    pub usage: Option<Usage>,
    /// The event that completes the stream went by (or an error that ends it, in the shapes
    /// whose streams end at an error): nothing may follow it.
    pub done: bool,
    /// An error event went by (an answer that is not complete, whatever follows).
    pub errored: bool,
}

impl Scanner {
    /// A scanner for an OpenAI chat or text completion stream.
    pub fn new(collect_text: bool) -> Scanner {
        Scanner::for_shape(Shape::Chat, collect_text)
    }

    pub fn for_shape(shape: Shape, collect_text: bool) -> Scanner {
        Scanner {
            shape,
            collect_text,
            ..Scanner::default()
        }
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// True once a content event has been seen.
    pub fn seen_content(&self) -> bool {
        self.seen_content
    }

    /// Forgets an unfinished event (the stream it came from is gone), keeping the answer text,
    /// usage and whether content was seen.
    pub fn reset_partial(&mut self) {
        self.line.clear();
        self.skipping = false;
        self.name.clear();
        self.data.clear();
        self.data_overflowed = false;
        self.has_data = false;
        self.has_comment = false;
        self.after_cr = false;
        self.in_event = false;
        self.done = false;
    }

    /// True when the bytes so far end exactly at an event boundary.
    pub fn at_boundary(&self) -> bool {
        self.line.is_empty() && !self.skipping && !self.in_event
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
            if self.line_end(&chunk[pos..end], &mut on_event) {
                boundary = Some(next);
            }
            pos = next;
        }
        self.line_part(&chunk[pos..]);
        boundary
    }

    /// Ends the line whose last piece is `last`; true when it was the blank line that ends an
    /// event.
    fn line_end(&mut self, last: &[u8], on_event: &mut impl FnMut(Event)) -> bool {
        if std::mem::take(&mut self.skipping) {
            return false;
        }
        if self.line.is_empty() {
            return self.line_done(last, on_event);
        }
        if self.line.len() + last.len() > WINDOW {
            self.overflow(last);
            self.skipping = false;
            return false;
        }
        let mut line = std::mem::take(&mut self.line);
        extend_within_window(&mut line, last);
        let ended = self.line_done(&line, on_event);
        self.line = reuse(line);
        ended
    }

    /// Keeps a piece of a line that continues in a later chunk, up to the window.
    fn line_part(&mut self, part: &[u8]) {
        if self.skipping || part.is_empty() {
            return;
        }
        if self.line.len() + part.len() > WINDOW {
            self.overflow(part);
        } else {
            extend_within_window(&mut self.line, part);
        }
    }

    /// A line longer than the window: only its head is read (is it data, and of which type?),
    /// the rest passes by unread, and the memory it took is given back.
    fn overflow(&mut self, next: &[u8]) {
        let mut head = std::mem::take(&mut self.line);
        head.truncate(HEAD);
        let room = HEAD - head.len();
        head.extend_from_slice(&next[..room.min(next.len())]);
        self.in_event = true;
        if let Some(value) = field(&head, b"data") {
            self.push_data(value);
            self.give_up_data();
        }
        self.skipping = true;
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
            self.push_data(value);
        } else if let Some(value) = field(line, b"event") {
            self.name.clear();
            self.name.extend_from_slice(&value[..value.len().min(HEAD)]);
        }
        // `id:` and `retry:` lines do not matter to the proxy.
        false
    }

    fn push_data(&mut self, value: &[u8]) {
        if !self.data_overflowed {
            let separator: &[u8] = if self.has_data { b"\n" } else { b"" };
            if self.data.len() + separator.len() + value.len() > WINDOW {
                // Only the head is kept: the data so far (up to it) and the start of this line.
                self.give_up_data();
                for part in [separator, value] {
                    let room = HEAD.saturating_sub(self.data.len());
                    self.data.extend_from_slice(&part[..room.min(part.len())]);
                }
            } else {
                extend_within_window(&mut self.data, separator);
                extend_within_window(&mut self.data, value);
            }
        }
        self.has_data = true;
    }

    /// The event's data is too large to read: only its head is kept, for its type.
    fn give_up_data(&mut self) {
        if self.data.len() > HEAD {
            self.data = self.data[..HEAD].to_vec();
        }
        self.data_overflowed = true;
    }

    fn dispatch(&mut self) -> Option<Event> {
        self.in_event = false;
        let had_comment = std::mem::take(&mut self.has_comment);
        let whole = !std::mem::take(&mut self.data_overflowed);
        let name = std::mem::take(&mut self.name);
        let event = if std::mem::take(&mut self.has_data) {
            let data = std::mem::take(&mut self.data);
            let event = self.classify(&name, &data, whole);
            self.data = reuse(data);
            Some(event)
        } else {
            had_comment.then_some(Event::KeepAlive)
        };
        self.name = reuse(name);
        match &event {
            Some(Event::Content) => self.seen_content = true,
            Some(Event::Error(_)) => {
                self.errored = true;
                // Anthropic and the Responses API close a stream after its error event: the
                // client has its error in its own shape, and nothing may be added after it.
                self.done |= self.shape != Shape::Chat;
            }
            Some(Event::Done) => self.done = true,
            Some(Event::KeepAlive) | None => {}
        }
        event
    }

    /// What one event means in this stream's shape. `whole` is false when its data outgrew the
    /// window and only its head is at hand.
    fn classify(&mut self, name: &[u8], data: &[u8], whole: bool) -> Event {
        if data == b"[DONE]" {
            return Event::Done;
        }
        match self.shape {
            Shape::Chat => chat::classify(self, data, whole),
            Shape::Messages => messages::classify(self, event_type(name, data), data, whole),
            Shape::Responses => responses::classify(self, event_type(name, data), data, whole),
        }
    }
}

/// Appends `bytes` (which fit the window), growing the buffer as usual but never past the window.
fn extend_within_window(buffer: &mut Vec<u8>, bytes: &[u8]) {
    let needed = buffer.len() + bytes.len();
    if needed > buffer.capacity() {
        let target = (buffer.capacity() * 2).clamp(needed, WINDOW.max(needed));
        buffer.reserve_exact(target - buffer.len());
    }
    buffer.extend_from_slice(bytes);
}

/// A buffer emptied for its next use, or dropped when one long line made it large.
fn reuse(mut buffer: Vec<u8>) -> Vec<u8> {
    if buffer.capacity() > KEEP_CAPACITY {
        return Vec::new();
    }
    buffer.clear();
    buffer
}

fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some(rest);
    }
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// An event's type: its `event:` name, or else the value of the first `"type"` key of its data
/// (both shapes that name their events put it first). Empty when neither says.
fn event_type<'a>(name: &'a [u8], data: &'a [u8]) -> &'a [u8] {
    if !name.is_empty() {
        return name;
    }
    let Some(at) = TYPE_KEY.find(data) else {
        return b"";
    };
    let value = data[at + 6..]
        .trim_ascii_start()
        .strip_prefix(b":")
        .map(<[u8]>::trim_ascii_start)
        .and_then(|rest| rest.strip_prefix(b"\""));
    match value {
        Some(rest) => memchr::memchr(b'"', rest).map_or(&b""[..], |end| &rest[..end]),
        None => b"",
    }
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
    /// Why the answer is a failure although it may have come with status 200: OpenRouter's
    /// "unavailable" answers, a chat choice finished with `finish_reason: "error"`, Anthropic's
    /// `{"type": "error"}`, a failed response of the Responses API.
    pub error: Option<String>,
    /// The error is one the shape calls transient (Anthropic's `overloaded_error` and
    /// `api_error`): another model may answer, whatever the status.
    pub transient: bool,
    pub usage: Option<Usage>,
}

/// Reads what the proxy needs from a complete JSON answer in `shape`. A body that mentions neither
/// `"error"` nor `"usage"` is not parsed at all.
pub fn json_answer(shape: Shape, body: &[u8]) -> JsonAnswer {
    if !names_usage_or_error(body) {
        return JsonAnswer::default();
    }
    match shape {
        Shape::Chat => chat::json_answer(body),
        Shape::Messages => messages::json_answer(body),
        Shape::Responses => responses::json_answer(body),
    }
}

/// The top-level `error` of a complete JSON body, if it has one.
pub fn json_body_error(body: &[u8]) -> Option<String> {
    json_answer(Shape::Chat, body).error
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` cut at `split`, checking that every boundary `feed` returns ends a line.
    pub(super) fn scan_split(shape: Shape, input: &[u8], split: &[usize]) -> (Vec<Event>, Scanner) {
        let mut scanner = Scanner::for_shape(shape, shape == Shape::Chat);
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

    /// Every single cut, and a cut after every byte, give the events, text and usage of the
    /// stream read whole.
    pub(super) fn every_split_gives_the_same(shape: Shape, input: &[u8]) -> (Vec<Event>, Scanner) {
        let (whole, scanner) = scan_split(shape, input, &[]);
        let every_byte: Vec<usize> = (1..input.len()).collect();
        for cuts in (0..input.len()).map(|a| vec![a]).chain([every_byte]) {
            let (events, split) = scan_split(shape, input, &cuts);
            assert_eq!(events, whole, "{shape:?} cut at {cuts:?}");
            assert_eq!(split.text, scanner.text);
            assert_eq!(split.usage, scanner.usage);
            assert_eq!((split.done, split.errored), (scanner.done, scanner.errored));
        }
        (whole, scanner)
    }

    #[test]
    fn event_types_from_names_or_data() {
        assert_eq!(event_type(b"message_stop", b"{}"), b"message_stop");
        assert_eq!(
            event_type(b"", br#"{ "type" : "response.completed","x":1}"#),
            b"response.completed"
        );
        assert_eq!(event_type(b"", br#"{"type":"trunc"#), b"");
        assert_eq!(event_type(b"", br#"{"kind":"x"}"#), b"");
    }

    #[test]
    fn usage_reports_overwrite_the_fields_they_have() {
        let mut usage = None;
        let start: ReportedUsage = serde_json::from_str(
            r#"{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}"#,
        )
        .unwrap();
        start.update(&mut usage);
        let delta: ReportedUsage =
            serde_json::from_str(r#"{"output_tokens":12,"cost":0.25}"#).unwrap();
        delta.update(&mut usage);
        let expected = Usage {
            prompt_tokens: 15,
            completion_tokens: 12,
            cost: Some(0.25),
        };
        assert_eq!(usage, Some(expected));
        let chat: ReportedUsage = serde_json::from_str(r#"{"prompt_tokens":3}"#).unwrap();
        chat.replace(&mut usage);
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 3,
                ..Usage::default()
            })
        );
    }

    /// One line far over the window, in pieces: the scanner never holds more than the window,
    /// gives the memory back, and still sees the events around it.
    #[test]
    fn an_enormous_line_passes_by_unread() {
        for (shape, open, close) in [
            (Shape::Chat, "data: {\"choices\":[{\"delta\":{\"content\":\"", "\"}}]}\n\n"),
            (
                Shape::Messages,
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"",
                "\"}}\n\n",
            ),
        ] {
            let mut scanner = Scanner::for_shape(shape, false);
            let mut events = Vec::new();
            scanner.feed(open.as_bytes(), |e| events.push(e));
            let piece = vec![b'x'; 1 << 20];
            for _ in 0..(3 * WINDOW) >> 20 {
                scanner.feed(&piece, |e| events.push(e));
                assert!(scanner.line.capacity() <= WINDOW, "{shape:?}");
            }
            assert!(scanner.line.capacity() <= KEEP_CAPACITY, "{shape:?}");
            assert!(!scanner.at_boundary());
            scanner.feed(close.as_bytes(), |e| events.push(e));
            scanner.feed(b"data: [DONE]\n\n", |e| events.push(e));
            assert_eq!(events, [Event::Content, Event::Done], "{shape:?}");
            assert!(scanner.at_boundary() && scanner.data.capacity() <= KEEP_CAPACITY);
        }
    }

    /// An event whose data lines add up past the window is classified by its head: a Responses
    /// API `response.completed` without an `event:` line still completes the stream.
    #[test]
    fn an_enormous_event_is_classified_by_its_head() {
        let mut scanner = Scanner::for_shape(Shape::Responses, false);
        let mut events = Vec::new();
        scanner.feed(b"data: {\"type\":\"response.completed\",\n", |e| {
            events.push(e)
        });
        let line = format!("data: \"{}\",\n", "y".repeat(1 << 20));
        for _ in 0..5 {
            scanner.feed(line.as_bytes(), |e| events.push(e));
        }
        assert!(scanner.data.len() <= HEAD);
        scanner.feed(b"data: \"usage\":{}}\n\n", |e| events.push(e));
        assert_eq!(events, [Event::Done]);
        assert!(scanner.done && scanner.usage.is_none());
    }
}
