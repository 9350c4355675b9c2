//! `/v1/files`: multipart uploads written to the store as they arrive (bounded by
//! `max_file_bytes`), listing, retrieval, content download and deletion.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyDataStream;
use multer::{Field, Multipart};

use super::{json, list_query, Answer, ApiError};
use crate::batch::body;
use crate::batch::input::LineCounter;
use crate::batch::model::{new_id, FileObject, Page};
use crate::batch::store::{ContentWriter, StoredFile};
use crate::batch::Inner;

/// After an upload is refused as too large, the rest of it is read and thrown away up to this
/// much, so that the client, still sending, reads the 413 instead of a reset.
const LINGER_BYTES: u64 = 64 * 1024 * 1024;
/// `purpose` and other small form fields.
const MAX_FIELD_BYTES: usize = 1024;
const MAX_FILENAME: usize = 256;

/// A file's content received whole, not yet listed.
struct Received {
    id: String,
    filename: String,
    bytes: u64,
    lines: u64,
    writer: Box<dyn ContentWriter>,
}

fn malformed(error: multer::Error) -> ApiError {
    ApiError::invalid(
        "file",
        format!("The multipart body could not be read: {error}."),
    )
}

pub(super) async fn upload<B>(inner: &Inner, owner: &str, headers: &HeaderMap, body: B) -> Answer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| multer::parse_boundary(value).ok())
        .ok_or_else(|| {
            ApiError::invalid(
                "file",
                "Expected a multipart/form-data body with 'file' and 'purpose' fields.",
            )
        })?;
    let mut multipart = Multipart::new(BodyDataStream::new(body), boundary);
    let (mut purpose, mut received) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("file") if received.is_none() => {
                received = Some(receive(inner, field).await?);
            }
            Some("purpose") => purpose = Some(small_text(field).await?),
            // Other fields (`expires_after[...]`) are read and ignored.
            _ => drop(small_text(field).await?),
        }
    }
    let received = received.ok_or_else(|| ApiError::missing("file"))?;
    match purpose.as_deref() {
        Some("batch") => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "purpose",
                "This proxy stores files for the Batch API only: 'purpose' must be 'batch'.",
            ))
        }
        None => return Err(ApiError::missing("purpose")),
    }
    received.writer.close().await?;
    let now = inner.now_secs();
    let mut object =
        FileObject::processed(received.id, received.filename, "batch", received.bytes, now);
    object.expires_at = Some(now.saturating_add(inner.config.retention.as_secs()));
    let file = StoredFile {
        owner: owner.to_owned(),
        lines: received.lines,
        object,
    };
    inner.store.insert_file(file.clone()).await?;
    json(&file.object)
}

/// Writes the `file` field to the store while it arrives, counting bytes and lines.
async fn receive(inner: &Inner, mut field: Field<'static>) -> Result<Received, ApiError> {
    let id = new_id("file-");
    let filename: String = field
        .file_name()
        .unwrap_or("upload.jsonl")
        .chars()
        .take(MAX_FILENAME)
        .collect();
    let mut writer = inner.store.create_content(&id).await?;
    let (mut bytes, mut lines) = (0u64, LineCounter::default());
    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
        bytes += chunk.len() as u64;
        if bytes > inner.config.max_file_bytes {
            drop(writer);
            linger(field).await;
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "The file is larger than {} bytes, the most this proxy accepts ([batch] max_file_bytes).",
                    inner.config.max_file_bytes
                ),
            )
            .param("file")
            .code("file_too_large"));
        }
        lines.feed(&chunk);
        writer.write(&chunk).await?;
    }
    Ok(Received {
        id,
        filename,
        bytes,
        lines: lines.count(),
        writer,
    })
}

/// Reads the rest of a refused field and throws it away, up to [`LINGER_BYTES`].
async fn linger(mut field: Field<'static>) {
    let mut discarded = 0u64;
    while let Ok(Some(chunk)) = field.chunk().await {
        discarded += chunk.len() as u64;
        if discarded > LINGER_BYTES {
            break;
        }
    }
}

/// A small text field, such as `purpose`.
async fn small_text(mut field: Field<'static>) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
        text.extend_from_slice(&chunk);
        if text.len() > MAX_FIELD_BYTES {
            return Err(ApiError::invalid(
                "purpose",
                format!("Form fields other than 'file' may have at most {MAX_FIELD_BYTES} bytes."),
            ));
        }
    }
    Ok(String::from_utf8_lossy(&text).trim().to_owned())
}

pub(super) async fn list(inner: &Inner, owner: &str, query: Option<&str>) -> Answer {
    let query = list_query(query, 10_000, 10_000)?;
    let limit = query.limit;
    let files = inner.store.list_files(owner, query).await?;
    json(&Page::new(files, limit, |file| &file.id))
}

pub(super) async fn get(inner: &Inner, owner: &str, id: &str) -> Answer {
    match inner.store.file(owner, id).await? {
        Some(file) => json(&file.object),
        None => Err(ApiError::no_such("File", id).param("file_id")),
    }
}

pub(super) async fn content(inner: &Inner, owner: &str, id: &str) -> Answer {
    let Some(file) = inner.store.file(owner, id).await? else {
        return Err(ApiError::no_such("File", id).param("file_id"));
    };
    let Some(reader) = inner.store.read_content(id).await? else {
        return Err(ApiError::no_such("File", id).param("file_id"));
    };
    let mut response = Response::new(body::content(reader));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.object.bytes));
    Ok(response)
}

pub(super) async fn delete(inner: &Inner, owner: &str, id: &str) -> Answer {
    if !inner.store.delete_file(owner, id).await? {
        return Err(ApiError::no_such("File", id).param("file_id"));
    }
    json(&serde_json::json!({ "id": id, "object": "file", "deleted": true }))
}
