//! A route's body policy, compiled: fields merged into the JSON body (`set_body`, as a JSON merge
//! patch), merged only where the client left them out (`default_body`), and removed
//! (`unset_body`). Only the top-level fields the policy touches are re-encoded; every other
//! field (messages above all) keeps its bytes.

use std::fmt;

use bytes::{Bytes, BytesMut};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::RouteConfig;

/// What a route does to the JSON bodies it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyPolicy {
    set: Map<String, Value>,
    defaults: Map<String, Value>,
    unset: Vec<String>,
}

impl BodyPolicy {
    /// The policy of a validated route; `None` when it has none.
    pub fn compile(route: &RouteConfig) -> Option<BodyPolicy> {
        let table = |value: &Option<toml::Value>| -> Map<String, Value> {
            match value.as_ref().map(serde_json::to_value) {
                Some(Ok(Value::Object(map))) => map,
                _ => Map::new(),
            }
        };
        let policy = BodyPolicy {
            set: table(&route.set_body),
            defaults: table(&route.default_body),
            unset: route.unset_body.clone(),
        };
        let empty = policy.set.is_empty() && policy.defaults.is_empty() && policy.unset.is_empty();
        (!empty).then_some(policy)
    }

    /// The body with the policy applied; `None` when it is not a JSON object.
    pub fn apply(&self, body: &[u8]) -> Option<Bytes> {
        let fields = top_level(body)?;
        let mut out = BytesMut::with_capacity(body.len() + 64);
        out.extend_from_slice(b"{");
        let mut first = true;
        let mut write = |out: &mut BytesMut, key: &str, value: &[u8]| {
            if !std::mem::take(&mut first) {
                out.extend_from_slice(b",");
            }
            out.extend_from_slice(serde_json::to_string(key).unwrap_or_default().as_bytes());
            out.extend_from_slice(b":");
            out.extend_from_slice(value);
        };
        for (key, raw) in &fields {
            if self.unset.iter().any(|u| u == key) {
                continue;
            }
            let patched = match (self.set.get(key), self.defaults.get(key)) {
                (None, None) => None,
                (set, defaults) => {
                    let mut value: Value = serde_json::from_str(raw.get()).ok()?;
                    if let Some(defaults) = defaults {
                        value = merge(defaults.clone(), value);
                    }
                    if let Some(set) = set {
                        value = merge(value, set.clone());
                    }
                    Some(serde_json::to_vec(&value).ok()?)
                }
            };
            match patched {
                Some(bytes) => write(&mut out, key, &bytes),
                None => write(&mut out, key, raw.get().as_bytes()),
            }
        }
        let absent =
            |key: &&String| !fields.iter().any(|(k, _)| k == *key) && !self.unset.contains(*key);
        let set_keys = self.set.keys();
        let default_keys = self.defaults.keys().filter(|k| !self.set.contains_key(*k));
        for key in set_keys.chain(default_keys).filter(absent) {
            let mut value = self.defaults.get(key).cloned().unwrap_or(Value::Null);
            if let Some(set) = self.set.get(key) {
                value = merge(value, set.clone());
            }
            let bytes = serde_json::to_vec(&value).ok()?;
            write(&mut out, key, &bytes);
        }
        out.extend_from_slice(b"}");
        Some(out.freeze())
    }

    /// The policy as JSON, for `explain`.
    pub fn describe(&self) -> Value {
        serde_json::json!({
            "set_body": self.set,
            "default_body": self.defaults,
            "unset_body": self.unset,
        })
    }
}

/// RFC 7396: objects merge key by key (a `null` removes the key), anything else replaces.
fn merge(target: Value, patch: Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch;
    };
    let mut target = match target {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(&key);
        } else {
            let current = target.remove(&key).unwrap_or(Value::Null);
            target.insert(key, merge(current, value));
        }
    }
    Value::Object(target)
}

/// The top-level fields of a JSON object in their order, each value as its raw bytes.
fn top_level(body: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    struct Fields;
    impl<'de> Visitor<'de> for Fields {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                fields.push((key, value));
            }
            Ok(fields)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let fields = (&mut deserializer).deserialize_map(Fields).ok()?;
    deserializer.end().ok()?;
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> BodyPolicy {
        let config =
            crate::config::Config::parse(&format!("[[routes]]\nname = \"r\"\n{text}")).unwrap();
        BodyPolicy::compile(&config.routes[0]).unwrap()
    }

    #[test]
    fn merges_removes_and_keeps_untouched_bytes() {
        let policy = policy(
            "set_body = { provider = { data_collection = \"deny\", zdr = true }, temperature = 0 }\n\
             unset_body = [\"logit_bias\"]\ndefault_body = { max_tokens = 100, top_p = 1 }\n",
        );
        let body = br#"{ "model":"m", "messages":[ {"role":"user", "content":"h\u00e9 { } "} ],
            "provider":{"order":["a"],"zdr":false}, "logit_bias":{"1":2}, "top_p": 0.5 }"#;
        let out = policy.apply(body).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains(r#""messages":[ {"role":"user", "content":"h\u00e9 { } "} ]"#),
            "{text}"
        );
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["provider"]["order"], serde_json::json!(["a"]));
        assert_eq!(value["provider"]["zdr"], true);
        assert_eq!(value["provider"]["data_collection"], "deny");
        assert_eq!(value["temperature"], 0);
        assert_eq!(
            value["top_p"], 0.5,
            "the client's value wins over a default"
        );
        assert_eq!(value["max_tokens"], 100);
        assert!(value.get("logit_bias").is_none());
        assert!(policy.apply(b"[1]").is_none());
    }
}
