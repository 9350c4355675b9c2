//! Reading a request body. JSON is read whole (routing and fallback need it), bounded in size and
//! time and decoded from gzip, deflate, br or zstd; other bodies (uploads) are streamed to the
//! upstream as they arrive, bounded in size and idle time. A refused body is read and thrown away
//! for a bounded while, so that the client reads the error instead of a connection reset.

use std::collections::VecDeque;
use std::io::Read;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::config::ServerConfig;
use crate::error::ProxyError;

/// Bounds on reading request bodies, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_json: usize,
    pub max_upload: u64,
    pub read_timeout: Duration,
    pub linger_timeout: Duration,
    pub linger_bytes: u64,
}

impl BodyLimits {
    pub fn new(server: &ServerConfig) -> BodyLimits {
        BodyLimits {
            max_json: server.max_body_bytes,
            max_upload: server.max_upload_bytes,
            read_timeout: server.body_read_timeout,
            linger_timeout: server.lingering_timeout,
            linger_bytes: server.lingering_bytes,
        }
    }
}

/// The declared `Content-Length`, when there is a valid one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads the whole body, decoded, within `limits`. A refused body is drained in the background.
pub async fn read_whole(
    headers: &HeaderMap,
    body: Incoming,
    limits: &BodyLimits,
) -> Result<Bytes, ProxyError> {
    let result = read_raw(headers, body, limits).await;
    let raw = match result {
        Ok(raw) => raw,
        Err((error, body)) => {
            linger(headers, body, limits);
            return Err(error);
        }
    };
    decode(headers, raw, limits.max_json)
}

type Refused = (ProxyError, Incoming);

async fn read_raw(
    headers: &HeaderMap,
    mut body: Incoming,
    limits: &BodyLimits,
) -> Result<Bytes, Refused> {
    let limit = limits.max_json;
    let too_large = ProxyError::BodyTooLarge { limit };
    if let Err(error) = Encoding::of(headers) {
        return Err((error, body));
    }
    if declared_length(headers).is_some_and(|len| len > limit as u64) {
        return Err((too_large, body));
    }
    let deadline = Instant::now() + limits.read_timeout;
    let mut parts: Vec<Bytes> = Vec::new();
    let mut size = 0;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let error = ProxyError::BodyTimeout(limits.read_timeout);
                return Err((error, body));
            }
            Ok(None) => break,
            // The client's side broke: nothing is left to drain.
            Ok(Some(Err(error))) => {
                return Err((ProxyError::ClientBody(error.to_string()), body));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            size += data.len();
            if size > limit {
                return Err((too_large, body));
            }
            parts.push(data);
        }
    }
    Ok(join(parts, size))
}

fn join(mut parts: Vec<Bytes>, size: usize) -> Bytes {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut joined = BytesMut::with_capacity(size);
    for part in parts {
        joined.extend_from_slice(&part);
    }
    joined.freeze()
}

/// Reads and discards what the client is still sending after its body was refused, up to the
/// lingering bounds, so that it reads the answer; then the body is dropped and hyper closes the
/// connection. A client that waits for `100 Continue` never sends the body: nothing to drain.
fn linger(headers: &HeaderMap, mut body: Incoming, limits: &BodyLimits) {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || body.is_end_stream() {
        return;
    }
    let (timeout, max_bytes) = (limits.linger_timeout, limits.linger_bytes);
    tokio::spawn(async move {
        let drain = async {
            let mut read = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                    if read > max_bytes {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(timeout, drain).await;
    });
}

/// A request `Content-Encoding` the proxy decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Encoding, ProxyError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Encoding::Identity);
        };
        let text = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
        match text.as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "deflate" => Ok(Encoding::Deflate),
            "br" => Ok(Encoding::Brotli),
            "zstd" => Ok(Encoding::Zstd),
            _ => Err(ProxyError::UnsupportedEncoding(
                String::from_utf8_lossy(value.as_bytes())
                    .chars()
                    .take(64)
                    .collect(),
            )),
        }
    }
}

/// Decodes a compressed body, refusing it as too large as soon as the decoded bytes pass `limit`
/// (a small body that expands without bound is refused, not buffered).
fn decode(headers: &HeaderMap, raw: Bytes, limit: usize) -> Result<Bytes, ProxyError> {
    let encoding = Encoding::of(headers)?;
    let reader: Box<dyn Read + '_> = match encoding {
        Encoding::Identity => return Ok(raw),
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&raw[..])),
        // HTTP's "deflate" is zlib-wrapped; some clients send raw deflate anyway.
        Encoding::Deflate if raw.first().is_some_and(|b| b & 0x0f == 8) => {
            Box::new(flate2::read::ZlibDecoder::new(&raw[..]))
        }
        Encoding::Deflate => Box::new(flate2::read::DeflateDecoder::new(&raw[..])),
        Encoding::Brotli => Box::new(brotli_decompressor::Decompressor::new(&raw[..], 8192)),
        Encoding::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(&raw[..])
                .map_err(|e| ProxyError::BadEncoding(e.to_string()))?,
        ),
    };
    let mut decoded = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut decoded)
        .map_err(|e| ProxyError::BadEncoding(e.to_string()))?;
    if decoded.len() > limit {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    Ok(Bytes::from(decoded))
}

/// Why a streamed upload stopped before it was sent whole.
#[derive(Debug, Default)]
pub struct UploadFault(Mutex<Option<ProxyError>>);

impl UploadFault {
    fn set(&self, error: ProxyError) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }

    /// The client-side reason an upstream request failed, if it was the upload's.
    pub fn take(&self) -> Option<ProxyError> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A request body streamed to the upstream as it arrives: what was read ahead (to find the
/// model), then the rest of the client's body, never more than the upload limit.
pub struct Upload {
    prefix: VecDeque<Bytes>,
    rest: Incoming,
    /// Bytes still to come when the client declared a length (adjusted for a model rewrite).
    length: Option<u64>,
    sent: u64,
    limit: u64,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    fault: Arc<UploadFault>,
}

/// The leading bytes of a form read to find its `model` field; a model field further in, after
/// a file, is not looked for.
const FORM_PREFIX_LIMIT: usize = 64 * 1024;

impl Upload {
    /// Starts streaming `body`. For a multipart form, its leading parts are read (never a file's
    /// contents) to find the `model` field routing needs, which is returned with the upload.
    pub async fn start(
        headers: &HeaderMap,
        mut body: Incoming,
        limits: &BodyLimits,
    ) -> Result<(Upload, Option<String>), ProxyError> {
        let length = declared_length(headers);
        if length.is_some_and(|len| len > limits.max_upload) {
            linger(headers, body, limits);
            return Err(ProxyError::UploadTooLarge {
                limit: limits.max_upload,
            });
        }
        let mut prefix = Vec::new();
        let model = match form_boundary(headers) {
            Some(boundary) => {
                let scan = form_model(&mut body, &mut prefix, boundary);
                match tokio::time::timeout(limits.read_timeout, scan).await {
                    Ok(model) => model,
                    Err(_) => {
                        linger(headers, body, limits);
                        return Err(ProxyError::BodyTimeout(limits.read_timeout));
                    }
                }
            }
            None => None,
        };
        let upload = Upload {
            sent: 0,
            prefix: prefix.into(),
            rest: body,
            length,
            limit: limits.max_upload,
            idle_timeout: limits.read_timeout,
            idle: Box::pin(tokio::time::sleep(limits.read_timeout)),
            fault: Arc::default(),
        };
        Ok((upload, model))
    }

    /// Where a failure of this upload is reported.
    pub fn fault(&self) -> Arc<UploadFault> {
        self.fault.clone()
    }

    /// Replaces the value of the form's `model` field in the bytes read ahead, when it is there.
    pub fn rewrite_model(&mut self, boundary: &str, from: &str, to: &str) -> bool {
        let prefix: Vec<Bytes> = self.prefix.drain(..).collect();
        let size = prefix.iter().map(Bytes::len).sum();
        let joined = join(prefix, size);
        match splice_form_model(&joined, boundary, from, to) {
            Some(rewritten) => {
                self.length = self
                    .length
                    .map(|len| (len + rewritten.len() as u64).saturating_sub(joined.len() as u64));
                self.prefix.push_back(rewritten);
                true
            }
            None => {
                self.prefix.push_back(joined);
                false
            }
        }
    }

    fn failed(&mut self, error: ProxyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = error.message();
        self.fault.set(error);
        Poll::Ready(Some(Err(message.into())))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let data = match this.prefix.pop_front() {
            Some(data) => data,
            None => match Pin::new(&mut this.rest).poll_frame(cx) {
                Poll::Pending => {
                    ready!(std::future::Future::poll(this.idle.as_mut(), cx));
                    return this.failed(ProxyError::BodyTimeout(this.idle_timeout));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(error))) => {
                    return this.failed(ProxyError::ClientBody(error.to_string()));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers are not forwarded.
                    Err(_) => Bytes::new(),
                },
            },
        };
        let deadline = Instant::now() + this.idle_timeout;
        this.idle.as_mut().reset(deadline);
        this.sent += data.len() as u64;
        if this.sent > this.limit {
            let limit = this.limit;
            return this.failed(ProxyError::UploadTooLarge { limit });
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

/// The boundary of a `multipart/form-data` body.
pub fn form_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    multer::parse_boundary(content_type).ok()
}

/// Reads the form's leading fields until `model`, a file, or the prefix bound; every byte read
/// is kept in `seen` to be sent on.
async fn form_model(
    body: &mut Incoming,
    seen: &mut Vec<Bytes>,
    boundary: String,
) -> Option<String> {
    let tee = Tee {
        body,
        seen,
        size: 0,
    };
    let mut form = multer::Multipart::new(tee, boundary);
    while let Ok(Some(field)) = form.next_field().await {
        if field.file_name().is_some() {
            return None;
        }
        if field.name() == Some("model") {
            return field.text().await.ok();
        }
    }
    None
}

/// The client's body as a stream for the form parser, keeping a copy of every chunk.
struct Tee<'a> {
    body: &'a mut Incoming,
    seen: &'a mut Vec<Bytes>,
    size: usize,
}

impl futures_core::Stream for Tee<'_> {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.size >= FORM_PREFIX_LIMIT {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut *this.body).poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.size += data.len();
                        this.seen.push(data.clone());
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
            }
        }
    }
}

/// `form` with the value of its `model` field changed from `from` to `to`, when the field is
/// found in it as a plain quoted `name="model"` part holding exactly `from`.
fn splice_form_model(form: &[u8], boundary: &str, from: &str, to: &str) -> Option<Bytes> {
    let find = |haystack: &[u8], needle: &[u8]| memchr::memmem::find(haystack, needle);
    let name = find(form, b"name=\"model\"")?;
    let start = name + find(&form[name..], b"\r\n\r\n")? + 4;
    let delimiter = format!("\r\n--{boundary}");
    let end = start + find(&form[start..], delimiter.as_bytes())?;
    if &form[start..end] != from.as_bytes() {
        return None;
    }
    let mut out = BytesMut::with_capacity(form.len() + to.len());
    out.extend_from_slice(&form[..start]);
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&form[end..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(encoding: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, encoding.parse().unwrap());
        headers
    }

    #[test]
    fn decodes_each_encoding_and_bounds_the_result() {
        use std::io::Write;
        let body = br#"{"model":"m","messages":[]}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert_eq!(
            decode(&headers("gzip"), gz.clone(), 100).unwrap(),
            &body[..]
        );
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(body).unwrap();
        let zlib = Bytes::from(zlib.finish().unwrap());
        assert_eq!(decode(&headers("deflate"), zlib, 100).unwrap(), &body[..]);
        assert!(matches!(
            decode(&headers("gzip"), gz, 10),
            Err(ProxyError::BodyTooLarge { limit: 10 })
        ));
        assert!(matches!(
            decode(&headers("gzip"), Bytes::from_static(b"not gzip"), 100),
            Err(ProxyError::BadEncoding(_))
        ));
        assert!(matches!(
            Encoding::of(&headers("compress")),
            Err(ProxyError::UnsupportedEncoding(name)) if name == "compress"
        ));
    }

    #[test]
    fn form_model_is_spliced_in_place() {
        let form = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF";
        let out = splice_form_model(form, "XyZ", "whisper", "openai/whisper-1").unwrap();
        let expected =
            String::from_utf8_lossy(form).replace("\n\r\nwhisper\r", "\n\r\nopenai/whisper-1\r");
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert!(splice_form_model(form, "XyZ", "other", "x").is_none());
    }
}
