//! Files' contents as Redis lists of chunks: written as they arrive under `fu:<id>` (expiring
//! unless written to), renamed to `fc:<id>` when closed (expiring until a file lists it), and
//! read back chunk by chunk.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::redis::Cmd;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use super::{valid_id, Ops, Shared};
use crate::batch::store::{ContentReader, ContentWriter, StoreError, StoreFuture};

/// Content is stored in chunks of this size.
const CHUNK: usize = 256 * 1024;
/// An upload not written to for this long (its replica died) is dropped.
const UPLOAD_TTL_SECS: u64 = 3600;
/// A closed content that no file lists (finalization cut short) is dropped after this.
const UNLISTED_TTL_SECS: u64 = 24 * 3600;

pub(super) fn upload_key(shared: &Shared, id: &str) -> String {
    shared.key(&format!("fu:{id}"))
}

pub(super) fn content_key(shared: &Shared, id: &str) -> String {
    shared.key(&format!("fc:{id}"))
}

pub(super) fn create(shared: Arc<Shared>, id: &str) -> Result<Box<dyn ContentWriter>, StoreError> {
    if !valid_id(id) {
        return Err(StoreError("not a file id".to_owned()));
    }
    Ok(Box::new(Writer {
        upload: upload_key(&shared, id),
        content: content_key(&shared, id),
        shared,
        buffer: Vec::with_capacity(CHUNK),
        closed: false,
    }))
}

struct Writer {
    shared: Arc<Shared>,
    upload: String,
    content: String,
    buffer: Vec<u8>,
    closed: bool,
}

impl Writer {
    /// Appends `chunk` to the upload and keeps it alive; `close` also moves it to its content
    /// key, in the same script.
    async fn push(&self, chunk: &[u8], close: bool) -> Result<(), StoreError> {
        let mut ops = Ops::default();
        let ttl = UPLOAD_TTL_SECS.to_string();
        ops.op(&[b"RPUSH", self.upload.as_bytes(), chunk]);
        ops.op(&[b"EXPIRE", self.upload.as_bytes(), ttl.as_bytes()]);
        if close {
            let ttl = UNLISTED_TTL_SECS.to_string();
            ops.op(&[b"RENAME", self.upload.as_bytes(), self.content.as_bytes()]);
            ops.op(&[b"EXPIRE", self.content.as_bytes(), ttl.as_bytes()]);
        }
        self.shared.guarded(&self.upload, "", "", ops).await?;
        Ok(())
    }
}

impl ContentWriter for Writer {
    fn write<'a>(&'a mut self, mut chunk: &'a [u8]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            while !chunk.is_empty() {
                let room = CHUNK - self.buffer.len();
                let take = room.min(chunk.len());
                self.buffer.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.buffer.len() == CHUNK {
                    let full = std::mem::take(&mut self.buffer);
                    self.push(&full, false).await?;
                }
            }
            Ok(())
        })
    }

    fn close(mut self: Box<Self>) -> StoreFuture<'static, ()> {
        Box::pin(async move {
            // The last chunk is written even when empty, so that an empty content exists.
            let rest = std::mem::take(&mut self.buffer);
            self.push(&rest, true).await?;
            self.closed = true;
            Ok(())
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        // Best effort: the upload expires anyway.
        let (shared, upload) = (self.shared.clone(), self.upload.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = shared.query::<i64>(&Cmd::del(&upload)).await;
            });
        }
    }
}

/// The content of `id`, streamed from a task that reads one chunk ahead.
pub(super) async fn read(
    shared: Arc<Shared>,
    id: &str,
) -> Result<Option<ContentReader>, StoreError> {
    if !valid_id(id) {
        return Ok(None);
    }
    let key = content_key(&shared, id);
    let chunks: u64 = shared.query(&Cmd::llen(&key)).await?;
    if chunks == 0 {
        return Ok(None);
    }
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        for index in 0..chunks {
            let chunk: Result<Option<Vec<u8>>, StoreError> =
                shared.query(&Cmd::lindex(&key, index as isize)).await;
            let sent = match chunk {
                Ok(Some(chunk)) => Ok(Bytes::from(chunk)),
                Ok(None) => Err(io::Error::other("the file was deleted while it was read")),
                Err(error) => Err(io::Error::other(error.0)),
            };
            let failed = sent.is_err();
            if sender.send(sent).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Some(Box::pin(Reader {
        receiver,
        current: Bytes::new(),
    })))
}

/// Reads what the task sends; an error it sends fails the read (a content cut short is never
/// taken for a whole one).
struct Reader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.current.is_empty() {
            match self.receiver.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.current = chunk,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let take = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..take]);
        self.current.advance(take);
        Poll::Ready(Ok(()))
    }
}
