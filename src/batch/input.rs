//! Validation of a batch input file, line by line: `{custom_id, method: "POST", url, body}` with
//! the batch's endpoint as `url` and a `model` in `body`. Pure: bytes in, a stored line or the
//! error OpenAI reports for it out.

use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::model::LineError;
use super::store::NewLine;

/// The endpoints a batch may target.
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// A `custom_id` is a key the caller matches answers by, not a payload.
const MAX_CUSTOM_ID: usize = 512;

#[derive(Deserialize)]
struct InputLine<'a> {
    custom_id: Option<serde_json::Value>,
    method: Option<serde_json::Value>,
    url: Option<serde_json::Value>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
}

/// Counts the lines of a file that hold something other than whitespace, as its bytes arrive.
#[derive(Debug, Default)]
pub struct LineCounter {
    lines: u64,
    in_line: bool,
}

impl LineCounter {
    pub fn feed(&mut self, chunk: &[u8]) {
        for &byte in chunk {
            if byte == b'\n' {
                self.lines += u64::from(self.in_line);
                self.in_line = false;
            } else if !byte.is_ascii_whitespace() {
                self.in_line = true;
            }
        }
    }

    /// Lines so far, a last one without its newline included.
    pub fn count(&self) -> u64 {
        self.lines + u64::from(self.in_line)
    }
}

fn error(line: u64, code: &str, param: Option<&str>, message: impl Into<String>) -> LineError {
    LineError {
        code: code.to_owned(),
        message: message.into(),
        param: param.map(str::to_owned),
        line: Some(line),
    }
}

/// Checks line `number` (1-based) of a batch targeting `endpoint`; `seen` collects the
/// `custom_id`s so far.
pub fn parse_line(
    text: &[u8],
    number: u64,
    endpoint: &str,
    seen: &mut HashSet<String>,
) -> Result<NewLine, LineError> {
    let missing = |param: &str| {
        error(
            number,
            "missing_required_parameter",
            Some(param),
            format!("Missing required parameter: '{param}'."),
        )
    };
    let input: InputLine<'_> = serde_json::from_slice(text).map_err(|_| {
        error(
            number,
            "invalid_json_line",
            None,
            "This line is not parseable as valid JSON.",
        )
    })?;
    let custom_id = match input.custom_id {
        Some(serde_json::Value::String(id)) if !id.is_empty() && id.len() <= MAX_CUSTOM_ID => id,
        Some(_) => {
            return Err(error(
                number,
                "invalid_custom_id",
                Some("custom_id"),
                format!(
                    "'custom_id' must be a non-empty string of at most {MAX_CUSTOM_ID} characters."
                ),
            ))
        }
        None => return Err(missing("custom_id")),
    };
    match input.method {
        Some(serde_json::Value::String(method)) if method == "POST" => {}
        Some(_) => {
            return Err(error(
                number,
                "invalid_method",
                Some("method"),
                "Only the POST method is supported for batch requests.",
            ))
        }
        None => return Err(missing("method")),
    }
    match input.url {
        Some(serde_json::Value::String(url)) if url == endpoint => {}
        Some(_) => {
            return Err(error(
                number,
                "invalid_url",
                Some("url"),
                format!("The URL of this request does not match the batch's endpoint, {endpoint}."),
            ))
        }
        None => return Err(missing("url")),
    }
    let body = input.body.ok_or_else(|| missing("body"))?;
    let body = request_body(body).ok_or_else(|| missing("body.model"))?;
    if !seen.insert(custom_id.clone()) {
        return Err(error(
            number,
            "duplicate_custom_id",
            Some("custom_id"),
            "The custom_id for this request is a duplicate of another request. The custom_id parameter must be unique for each request in a batch.",
        ));
    }
    Ok(NewLine {
        line: number,
        custom_id,
        body,
    })
}

/// The body to send: an object with a non-empty string `model`, without `stream` and
/// `stream_options` (lines are never streamed). Every other member keeps its bytes and order.
fn request_body(body: &RawValue) -> Option<Bytes> {
    let Members(members) = serde_json::from_str(body.get()).ok()?;
    let has_model = members.iter().any(|(key, value)| {
        key == "model"
            && matches!(serde_json::from_str::<&str>(value.get()), Ok(m) if !m.is_empty())
    });
    if !has_model {
        return None;
    }
    if !members.iter().any(|(key, _)| is_stream_key(key)) {
        return Some(Bytes::copy_from_slice(body.get().as_bytes()));
    }
    let mut out = String::with_capacity(body.get().len());
    out.push('{');
    for (key, value) in members.iter().filter(|(key, _)| !is_stream_key(key)) {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).ok()?);
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Some(Bytes::from(out))
}

fn is_stream_key(key: &str) -> bool {
    key == "stream" || key == "stream_options"
}

/// A JSON object's members in their order, values untouched.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Ordered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/v1/chat/completions";

    fn parse(text: &str, seen: &mut HashSet<String>) -> Result<NewLine, LineError> {
        parse_line(text.as_bytes(), 7, CHAT, seen)
    }

    #[test]
    fn a_good_line_keeps_its_body_bytes() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi  there"}]}"#;
        let text = format!(r#"{{"custom_id":"a","method":"POST","url":"{CHAT}","body":{body}}}"#);
        let line = parse(&text, &mut HashSet::new()).unwrap();
        assert_eq!((line.line, line.custom_id.as_str()), (7, "a"));
        assert_eq!(line.body, body);
    }

    #[test]
    fn streaming_is_forced_off_and_the_rest_kept_in_order() {
        let text = format!(
            r#"{{"custom_id":"a","method":"POST","url":"{CHAT}","body":{{"stream":true,"model":"m","stream_options":{{"include_usage":true}},"n":1}}}}"#
        );
        let line = parse(&text, &mut HashSet::new()).unwrap();
        assert_eq!(line.body, r#"{"model":"m","n":1}"#);
    }

    #[test]
    fn each_fault_gets_its_code() {
        let ok_body = r#"{"model":"m"}"#;
        let cases = [
            ("{not json".to_owned(), "invalid_json_line"),
            (
                format!(r#"{{"method":"POST","url":"{CHAT}","body":{ok_body}}}"#),
                "missing_required_parameter",
            ),
            (
                format!(r#"{{"custom_id":1,"method":"POST","url":"{CHAT}","body":{ok_body}}}"#),
                "invalid_custom_id",
            ),
            (
                format!(r#"{{"custom_id":"a","method":"GET","url":"{CHAT}","body":{ok_body}}}"#),
                "invalid_method",
            ),
            (
                format!(
                    r#"{{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{ok_body}}}"#
                ),
                "invalid_url",
            ),
            (
                format!(
                    r#"{{"custom_id":"a","method":"POST","url":"{CHAT}","body":{{"messages":[]}}}}"#
                ),
                "missing_required_parameter",
            ),
            (
                format!(
                    r#"{{"custom_id":"a","method":"POST","url":"{CHAT}","body":{{"model":""}}}}"#
                ),
                "missing_required_parameter",
            ),
            (
                format!(r#"{{"custom_id":"a","method":"POST","url":"{CHAT}","body":[1]}}"#),
                "missing_required_parameter",
            ),
        ];
        for (text, code) in cases {
            let err = parse(&text, &mut HashSet::new()).unwrap_err();
            assert_eq!(err.code, code, "{text}");
            assert_eq!(err.line, Some(7));
        }
    }

    #[test]
    fn lines_are_counted_across_chunks_blank_ones_aside() {
        let mut counter = LineCounter::default();
        for chunk in ["{\"a\"", ":1}\n\n  \n{", "}\r\n", "{}"] {
            counter.feed(chunk.as_bytes());
        }
        assert_eq!(counter.count(), 3);
    }

    #[test]
    fn a_repeated_custom_id_is_refused() {
        let text =
            format!(r#"{{"custom_id":"a","method":"POST","url":"{CHAT}","body":{{"model":"m"}}}}"#);
        let mut seen = HashSet::new();
        parse(&text, &mut seen).unwrap();
        assert_eq!(
            parse(&text, &mut seen).unwrap_err().code,
            "duplicate_custom_id"
        );
    }
}
