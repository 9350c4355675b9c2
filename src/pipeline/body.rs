//! The request body as read once: the facts routing needs, and a model rewrite that leaves every
//! other byte untouched.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A JSON request body with the position of its top-level `model` value.
#[derive(Debug, Clone)]
pub struct JsonBody {
    pub bytes: Bytes,
    /// The requested model and the byte range of its JSON string in `bytes`.
    pub model: Option<(String, std::ops::Range<usize>)>,
    pub stream: bool,
}

#[derive(Deserialize)]
struct TopLevel<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Why a body is not a usable JSON request.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON, not an object, or a field of the wrong type; the text says where.
    Invalid(String),
    /// `model` present but not a string.
    ModelNotString,
}

impl JsonBody {
    /// Validates the whole body as JSON (one pass, no allocation for nested values) and finds the
    /// top-level `model` and `stream` fields.
    pub fn parse(bytes: Bytes) -> Result<JsonBody, BodyError> {
        let top: TopLevel<'_> =
            serde_json::from_slice(&bytes).map_err(|e| BodyError::Invalid(describe(&e)))?;
        let model = match top.model {
            None => None,
            Some(raw) => {
                let text = raw.get();
                let value: String =
                    serde_json::from_str(text).map_err(|_| BodyError::ModelNotString)?;
                let start = text.as_ptr() as usize - bytes.as_ptr() as usize;
                Some((value, start..start + text.len()))
            }
        };
        Ok(JsonBody {
            model,
            stream: top.stream.unwrap_or(false),
            bytes,
        })
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_ref().map(|(model, _)| model.as_str())
    }

    /// The body with its `model` value replaced; every other byte is copied as it is. A body
    /// without a `model` field, or one that already names `model`, is returned without a copy.
    pub fn with_model(&self, model: &str) -> Bytes {
        let Some((current, range)) = &self.model else {
            return self.bytes.clone();
        };
        if current == model {
            return self.bytes.clone();
        }
        // Quotes and a few escapes; the buffer grows if a name needs more.
        let room = self.bytes.len() - range.len() + model.len() + 8;
        let mut out = BytesMut::with_capacity(room).writer();
        out.get_mut().extend_from_slice(&self.bytes[..range.start]);
        // Escaping a string into memory cannot fail; the branch only keeps the body whole if it did.
        if serde_json::to_writer(&mut out, model).is_err() {
            return self.bytes.clone();
        }
        let mut out = out.into_inner();
        out.extend_from_slice(&self.bytes[range.end..]);
        out.freeze()
    }
}

fn describe(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match error.classify() {
        Category::Data => format!("request body has a field of the wrong type: {error}"),
        Category::Eof => format!("request body is not complete JSON: {error}"),
        Category::Syntax | Category::Io => format!("request body is not valid JSON: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_model_and_stream() {
        let body = JsonBody::parse(Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"{\"model\":1}"}], "model" : "fast","stream":true}"#,
        ))
        .unwrap();
        assert_eq!(body.model(), Some("fast"));
        assert!(body.stream);
    }

    #[test]
    fn rewrite_keeps_every_other_byte() {
        let raw = "{ \"model\":\"fast\" ,\n \"messages\":[{\"content\":\"h\\u00e9 \\\"model\\\": x\"}],\"n\":1.50}";
        let body = JsonBody::parse(Bytes::from(raw)).unwrap();
        let out = body.with_model("openai/gpt-4o-\"mini\"");
        let expected = raw.replace("\"fast\"", "\"openai/gpt-4o-\\\"mini\\\"\"");
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
    }

    #[test]
    fn escaped_model_is_decoded() {
        let body = JsonBody::parse(Bytes::from_static(br#"{"model":"f\u0061st"}"#)).unwrap();
        assert_eq!(body.model(), Some("fast"));
        assert_eq!(&body.with_model("x")[..], br#"{"model":"x"}"#);
    }

    #[test]
    fn rejects_bad_bodies() {
        for bad in [
            &b"{"[..],
            b"[1]",
            b"{\"model\":1}",
            b"{\"stream\":\"yes\"}",
            b"",
            b"nul",
        ] {
            assert!(JsonBody::parse(Bytes::from_static(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            JsonBody::parse(Bytes::from_static(b"{\"model\":1}")).unwrap_err(),
            BodyError::ModelNotString
        );
    }
}
