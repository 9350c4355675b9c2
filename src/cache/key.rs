//! Cache keys: a 128-bit hash of what makes two requests the same (path, planned attempts,
//! caller, canonical JSON body), and how the client's `Cache-Control` asks the cache to behave.

use std::hash::{DefaultHasher, Hasher};
use std::io::Write;

use http::HeaderMap;

/// Identifies a cacheable request: 128 bits of SipHash over the fields listed in [`CacheKey::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(u128);

impl CacheKey {
    /// The key as a number, for stores that name entries by it.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Hashes, in order: the upstream path with its query, the attempt chain (the models the
    /// route would try), the caller's identity (when callers bring their own keys or tokens), and
    /// the JSON body in canonical form (object keys sorted, no insignificant whitespace), so
    /// that key order and formatting do not matter. `None` when the body is not JSON.
    pub fn new(path: &str, chain: &[&str], tenant: Option<&[u8]>, body: &[u8]) -> Option<CacheKey> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let mut hasher = KeyHasher::new();
        hasher.field(path.as_bytes());
        for model in chain {
            hasher.field(model.as_bytes());
        }
        hasher.field(b"");
        match tenant {
            Some(tenant) => {
                hasher.field(b"tenant");
                hasher.field(tenant);
            }
            None => hasher.field(b"shared"),
        }
        canonical(&value, &mut hasher).ok()?;
        Some(CacheKey(hasher.finish()))
    }
}

/// Two SipHash states with different seeds, for a 128-bit key that collisions cannot reach.
struct KeyHasher(DefaultHasher, DefaultHasher);

impl KeyHasher {
    fn new() -> KeyHasher {
        let mut second = DefaultHasher::new();
        second.write_u64(0x9e37_79b9_7f4a_7c15);
        KeyHasher(DefaultHasher::new(), second)
    }

    /// A length-prefixed field, so that field boundaries cannot be shifted.
    fn field(&mut self, bytes: &[u8]) {
        self.0.write_usize(bytes.len());
        self.1.write_usize(bytes.len());
        self.0.write(bytes);
        self.1.write(bytes);
    }

    fn finish(&self) -> u128 {
        (u128::from(self.0.finish()) << 64) | u128::from(self.1.finish())
    }
}

impl Write for KeyHasher {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.write(bytes);
        self.1.write(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `value` as compact JSON with object keys in sorted order.
fn canonical(value: &serde_json::Value, out: &mut KeyHasher) -> std::io::Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.write_all(b"{")?;
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                serde_json::to_writer(&mut *out, key)?;
                out.write_all(b":")?;
                if let Some(value) = map.get(key) {
                    canonical(value, out)?;
                }
            }
            out.write_all(b"}")
        }
        serde_json::Value::Array(items) => {
            out.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                canonical(item, out)?;
            }
            out.write_all(b"]")
        }
        scalar => serde_json::to_writer(&mut *out, scalar).map_err(std::io::Error::from),
    }
}

/// How the client's `Cache-Control` asks the cache to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Normal,
    /// `no-cache`: do not answer from the cache, but store the fresh answer.
    Refresh,
    /// `no-store`: neither read nor write.
    Bypass,
}

pub fn directive(headers: &HeaderMap) -> Directive {
    let mut directive = Directive::Normal;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
            match token.as_str() {
                "no-store" => return Directive::Bypass,
                "no-cache" | "max-age=0" => directive = Directive::Refresh,
                _ => {}
            }
        }
    }
    directive
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key(body: &str) -> Option<CacheKey> {
        CacheKey::new("/chat/completions", &["m"], None, body.as_bytes())
    }

    #[test]
    fn key_ignores_order_and_whitespace() {
        let a = key(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#);
        let b = key("{ \"temperature\" : 0,\n \"messages\": [ {\"content\":\"hi\", \"role\":\"user\"} ], \"model\":\"m\" }");
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_ne!(
            a,
            key(r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#)
        );
        assert_ne!(
            a,
            key(r#"{"model":"m","messages":[{"content":"hi","role":"user"}],"temperature":1}"#)
        );
        assert_eq!(key("not json"), None);
    }

    #[test]
    fn key_separates_paths_chains_and_tenants() {
        let body = br#"{"model":"m"}"#;
        let base = CacheKey::new("/chat/completions", &["a", "b"], None, body);
        assert_ne!(base, CacheKey::new("/completions", &["a", "b"], None, body));
        assert_ne!(base, CacheKey::new("/chat/completions", &["a"], None, body));
        assert_ne!(
            base,
            CacheKey::new("/chat/completions", &["ab"], None, body)
        );
        let alice = CacheKey::new("/chat/completions", &["a", "b"], Some(b"alice"), body);
        assert_ne!(base, alice);
        assert_ne!(
            alice,
            CacheKey::new("/chat/completions", &["a", "b"], Some(b"bob"), body)
        );
    }

    #[test]
    fn cache_control_directives() {
        let mut headers = HeaderMap::new();
        assert_eq!(directive(&headers), Directive::Normal);
        headers.insert("cache-control", HeaderValue::from_static("No-Cache"));
        assert_eq!(directive(&headers), Directive::Refresh);
        headers.append(
            "cache-control",
            HeaderValue::from_static("max-age=5, no-store"),
        );
        assert_eq!(directive(&headers), Directive::Bypass);
    }
}
