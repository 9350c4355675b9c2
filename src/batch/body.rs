//! Response bodies of the Batch API: small JSON documents, and file contents streamed from the
//! store in chunks.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::io::ReadBuf;

use super::store::ContentReader;

/// The body of every Batch API response.
pub type ApiBody = BoxBody<Bytes, std::io::Error>;

/// Bytes read from a file's content per frame.
const CHUNK: usize = 64 * 1024;

/// A body sent whole.
pub(super) fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A file's content, read as the client takes it.
pub(super) fn content(reader: ContentReader) -> ApiBody {
    ContentBody {
        reader,
        chunk: vec![0; CHUNK],
    }
    .boxed()
}

struct ContentBody {
    reader: ContentReader,
    chunk: Vec<u8>,
}

impl Body for ContentBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let mut buf = ReadBuf::new(&mut this.chunk);
        if let Err(error) = ready!(this.reader.as_mut().poll_read(cx, &mut buf)) {
            return Poll::Ready(Some(Err(error)));
        }
        let read = buf.filled();
        // Zero bytes read is the end of the content.
        Poll::Ready((!read.is_empty()).then(|| Ok(Frame::data(Bytes::copy_from_slice(read)))))
    }
}
