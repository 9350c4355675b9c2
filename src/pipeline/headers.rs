//! Headers on the way through: the response headers the proxy adds, and the client's request
//! headers as every upstream sees them (hop-by-hop and credential headers gone, identity encoding
//! asked for, the route's edits applied); the upstream's own headers and key are added per
//! attempt.

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
/// credential header dropped, identity encoding asked for, the route's removals applied.
pub fn for_upstream(client: &HeaderMap, route: &Route) -> HeaderMap {
    let mut headers = client.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    crate::auth::remove_credentials(&mut headers);
    // Compressed answers could not be scanned for usage and errors on the way through, and on the
    // short hop compression buys nothing; without the header a server may compress anyway.
    headers.insert(header::ACCEPT_ENCODING, IDENTITY.clone());
    // The body was read whole already, or is streamed by the proxy: the client's 100-continue
    // handshake is over.
    headers.remove(header::EXPECT);
    for name in &route.remove_headers {
        headers.remove(name);
    }
    headers
}

/// The headers of one attempt: `base` (from [`for_upstream`]), then the upstream's own headers,
/// the route's `set_headers` (which win over the upstream's), and the credentials, if any.
pub fn for_attempt(
    base: &HeaderMap,
    upstream: &Upstream,
    route: &Route,
    credentials: Option<&HeaderValue>,
) -> HeaderMap {
    let mut headers = base.clone();
    for (name, value) in upstream.headers.iter().chain(&route.set_headers) {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(credentials) = credentials {
        headers.insert(header::AUTHORIZATION, credentials.clone());
    }
    headers
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
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
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
