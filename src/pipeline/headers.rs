//! Headers on the way through: the response headers the proxy adds, and the client's request
//! headers as every upstream sees them (hop-by-hop and credential headers gone, identity encoding
//! asked for, the route's edits applied); the upstream's own headers and key are added per
//! attempt.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::runtime::router::Route;
use crate::runtime::upstreams::Upstream;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_PROXY_MODEL: HeaderName = HeaderName::from_static("x-proxy-model");
pub static X_PROXY_UPSTREAM: HeaderName = HeaderName::from_static("x-proxy-upstream");
pub static X_PROXY_ATTEMPTS: HeaderName = HeaderName::from_static("x-proxy-attempts");
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static X_CACHE_TIER: HeaderName = HeaderName::from_static("x-cache-tier");
static IDENTITY: HeaderValue = HeaderValue::from_static("identity");

/// The client's headers as every upstream should see them: hop-by-hop, `Host`, length and every
/// credential header dropped, identity encoding asked for, the route's removals applied. Built in
/// one pass over the client's headers, without a removal (a hash lookup each) per dropped name.
pub fn for_upstream(client: &HeaderMap, route: &Route) -> HeaderMap {
    let named = connection_named(client);
    let mut headers = HeaderMap::with_capacity(client.len() + 1);
    for (name, value) in client {
        let dropped = hop_by_hop(name)
            || NOT_FORWARDED.contains(name)
            || crate::auth::is_credential(name)
            || named.contains(name)
            || route.remove_headers.contains(name);
        if !dropped {
            headers.append(name.clone(), value.clone());
        }
    }
    // Compressed answers could not be scanned for usage and errors on the way through, and on the
    // short hop compression buys nothing; without the header a server may compress anyway.
    headers.insert(header::ACCEPT_ENCODING, IDENTITY.clone());
    headers
}

/// Request headers that are the proxy's to set, not the client's: the host and length of the
/// upstream request, and the encoding it asks for. The client's 100-continue handshake is over
/// once the proxy reads the body.
static NOT_FORWARDED: [HeaderName; 4] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::ACCEPT_ENCODING,
    header::EXPECT,
];

/// Headers that describe one connection (RFC 9110, section 7.6.1), never passed on, besides those
/// a `Connection` header names.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

fn hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The headers a `Connection` header names; none (and nothing allocated) without one.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// The headers of one attempt: `base` (from [`for_upstream`]), then the upstream's own headers,
/// the route's `set_headers` (which win over the upstream's), and the credentials, if any.
pub fn for_attempt(
    base: &HeaderMap,
    upstream: &Upstream,
    route: &Route,
    credentials: Option<&HeaderValue>,
) -> HeaderMap {
    // Sized once for everything below: no growth while the map is built.
    let added = upstream.headers.len() + route.set_headers.len() + 1;
    let mut headers = HeaderMap::with_capacity(base.len() + added);
    for (name, value) in base {
        headers.append(name.clone(), value.clone());
    }
    for (name, value) in upstream.headers.iter().chain(&route.set_headers) {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(credentials) = credentials {
        headers.insert(header::AUTHORIZATION, credentials.clone());
    }
    headers
}

/// Drops the hop-by-hop headers of an answer. Most answers have at most one, so the names are
/// looked for in one pass before anything is removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let mut gone = connection_named(headers);
    gone.extend(headers.keys().filter(|name| hop_by_hop(name)).cloned());
    for name in gone {
        headers.remove(name);
    }
}

/// A fresh request id, `prefix` then `n` in lower-case hex (16 and at least 8 digits): as text,
/// and as a header value whose clones share one allocation.
pub fn generated_id(prefix: u64, n: u64) -> (String, HeaderValue) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let write = |value: u64, out: &mut [u8]| {
        for (at, byte) in out.iter_mut().rev().enumerate() {
            *byte = HEX[(value >> (4 * at)) as usize & 0xf];
        }
    };
    // The digits `n` needs, and never fewer than 8.
    let n_digits = (16 - n.leading_zeros() as usize / 4).max(8);
    let len = 16 + n_digits;
    let mut id = [0u8; 32];
    write(prefix, &mut id[..16]);
    write(n, &mut id[16..len]);
    let text = id[..len].iter().map(|&b| char::from(b)).collect();
    let value = HeaderValue::from_maybe_shared(Bytes::from_owner(id).slice(..len));
    // Hex digits are always a valid header value.
    (text, value.unwrap_or_else(|_| HeaderValue::from_static("")))
}

/// `x-proxy-attempts` and other small counts, without formatting one for every answer.
pub fn count_value(n: usize) -> HeaderValue {
    static SMALL: [HeaderValue; 10] = [
        HeaderValue::from_static("0"),
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
        HeaderValue::from_static("4"),
        HeaderValue::from_static("5"),
        HeaderValue::from_static("6"),
        HeaderValue::from_static("7"),
        HeaderValue::from_static("8"),
        HeaderValue::from_static("9"),
    ];
    match SMALL.get(n) {
        Some(value) => value.clone(),
        None => HeaderValue::from(n),
    }
}

/// Sets `name` to `value` when `value` is a valid header value (model names come from clients).
pub fn set_text(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        headers.append("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2);
        assert_eq!(headers.get_all("x-kept").iter().count(), 2);
        // Without hop-by-hop headers, nothing changes.
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn generated_ids_read_like_formatted_ones() {
        for (prefix, n) in [
            (0, 0),
            (0x1234_5678_9abc_def0, 42),
            (u64::MAX, u64::from(u32::MAX)),
        ] {
            let (text, value) = generated_id(prefix, n);
            assert_eq!(text, format!("{prefix:016x}{n:08x}"));
            assert_eq!(value.to_str().unwrap(), text);
        }
        for n in [1 << 40, u64::MAX] {
            let (text, value) = generated_id(7, n);
            assert_eq!(text, format!("{:016x}{n:08x}", 7));
            assert_eq!(value.to_str().unwrap(), text);
        }
    }

    #[test]
    fn counts_are_decimal() {
        for n in [0, 1, 9, 10, 123] {
            assert_eq!(count_value(n).to_str().unwrap(), n.to_string());
        }
    }
}
