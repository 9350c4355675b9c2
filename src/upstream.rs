//! The pooled upstream client (rustls, HTTP/2 via ALPN and HTTP/1.1) and where a request is sent:
//! the client's path under `/v1`, checked, joined to `base_url`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::error::ProxyError;

/// The client every attempt goes through; cheap to clone. It keeps one connection pool per
/// serving runtime (see `serving`) and sends each request from the pool of the runtime it runs
/// on, so an upstream connection is driven by the thread whose requests use it.
#[derive(Clone)]
pub struct UpstreamClient {
    pools: Arc<[PooledClient]>,
}

type PooledClient = Client<HttpsConnector<HttpConnector>, OutBody>;

impl UpstreamClient {
    /// Sends `request` on a connection of the calling runtime's pool.
    #[inline]
    pub fn request(&self, request: Request<OutBody>) -> ResponseFuture {
        let pools = &self.pools;
        let pool = pools.get(crate::serving::current()).unwrap_or(&pools[0]);
        pool.request(request)
    }
}

/// A body streamed to the upstream as it arrives.
pub type StreamedBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What an upstream request carries: a body read whole (which a fallback can send again), or an
/// upload streamed through as the client sends it.
pub enum OutBody {
    Full(Option<Bytes>),
    Stream(StreamedBody),
}

impl From<Bytes> for OutBody {
    fn from(bytes: Bytes) -> OutBody {
        OutBody::Full(Some(bytes))
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(bytes) => bytes.is_none(),
            OutBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            OutBody::Full(None) => SizeHint::with_exact(0),
            OutBody::Stream(body) => body.size_hint(),
        }
    }
}

/// Builds the pooled client, a pool for each serving runtime. TLS certificates are always
/// verified, against the bundled webpki roots plus the system's roots where it has any.
pub fn client(config: &UpstreamConfig) -> Result<UpstreamClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A missing or unreadable system store is normal in a distroless image; the bundled roots remain.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS set-up failed: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(1024);
    let pools = (0..crate::serving::count())
        .map(|_| builder.build(https.clone()))
        .collect();
    Ok(UpstreamClient { pools })
}

pub use crate::config::BaseUrl;

/// `/v1/chat/completions` -> `/chat/completions`; anything outside `/v1` is unknown here.
pub fn api_path(path: &str) -> Result<&str, ProxyError> {
    let rest = match path.strip_prefix("/v1") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => return Err(ProxyError::UnknownPath),
    };
    if check_path(rest) {
        Ok(rest)
    } else {
        Err(ProxyError::BadPath)
    }
}

/// Rejects client paths that could leave `base_url`: dot segments, encoded slashes or dots, and
/// backslashes, in any spelling.
pub fn check_path(rest: &str) -> bool {
    // An encoded `/`, `\\` or `.` could smuggle a segment past the checks below.
    let encoded_separator = rest.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f' | b'e') | (b'5', b'c')
            )
    });
    if encoded_separator
        || rest.contains(['\\', '?', '#'])
        || !(rest.is_empty() || rest.starts_with('/'))
    {
        return false;
    }
    !rest
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths() {
        assert_eq!(
            api_path("/v1/chat/completions").unwrap(),
            "/chat/completions"
        );
        assert_eq!(api_path("/v1").unwrap(), "");
        assert!(matches!(api_path("/v2/x"), Err(ProxyError::UnknownPath)));
        assert!(matches!(api_path("/v1x"), Err(ProxyError::UnknownPath)));
        assert!(matches!(api_path("/v1/../admin"), Err(ProxyError::BadPath)));
    }

    #[test]
    fn rejects_escaping_paths() {
        for bad in [
            "/../x",
            "/a/../../b",
            "/%2e%2e/x",
            "/a%2Fb",
            "/.",
            "/a\\..\\b",
        ] {
            assert!(!check_path(bad), "{bad}");
        }
        for good in ["/chat/completions", "", "/models/openai/gpt-4o", "/a..b"] {
            assert!(check_path(good), "{good}");
        }
    }
}
