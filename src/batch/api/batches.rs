//! `/v1/batches`: creation (checked against the input file and `max_lines`), listing,
//! retrieval and cancellation.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;

use super::{json, list_query, Answer, ApiError};
use crate::batch::input::ENDPOINTS;
use crate::batch::model::{new_id, Batch, Page};
use crate::batch::store::Cancel;
use crate::batch::Inner;

/// A batch creation request is a few hundred bytes; this leaves room for full metadata.
const MAX_CREATE_BYTES: usize = 64 * 1024;
/// OpenAI's only completion window.
const WINDOW: &str = "24h";
const WINDOW_SECS: u64 = 24 * 3600;

#[derive(Deserialize)]
struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

async fn read_json<B>(body: B) -> Result<CreateBatch, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = match Limited::new(body, MAX_CREATE_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The request body is larger than {MAX_CREATE_BYTES} bytes."),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "The request body could not be read.",
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request: expected an object with input_file_id, endpoint, completion_window and optional string metadata.",
        )
    })
}

fn check_metadata(metadata: Option<&BTreeMap<String, String>>) -> Result<(), ApiError> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    let fits = metadata.len() <= 16
        && metadata
            .iter()
            .all(|(key, value)| key.chars().count() <= 64 && value.chars().count() <= 512);
    if fits {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "metadata",
            "'metadata' may have at most 16 keys of at most 64 characters, with values of at most 512.",
        ))
    }
}

pub(super) async fn create<B>(inner: &Inner, owner: &str, body: B) -> Answer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let request = read_json(body).await?;
    let input_file_id = request
        .input_file_id
        .ok_or_else(|| ApiError::missing("input_file_id"))?;
    let endpoint = request
        .endpoint
        .ok_or_else(|| ApiError::missing("endpoint"))?;
    if !ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(ApiError::invalid(
            "endpoint",
            format!(
                "Unsupported endpoint. Batches may target {}.",
                ENDPOINTS.join(", ")
            ),
        ));
    }
    match request.completion_window.as_deref() {
        Some(WINDOW) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "completion_window",
                "Invalid 'completion_window': only '24h' is supported.",
            ))
        }
        None => return Err(ApiError::missing("completion_window")),
    }
    check_metadata(request.metadata.as_ref())?;
    let Some(file) = inner.store.file(owner, &input_file_id).await? else {
        return Err(ApiError::no_such("File", &input_file_id).param("input_file_id"));
    };
    if file.object.purpose != "batch" {
        return Err(ApiError::invalid(
            "input_file_id",
            "The input file must be uploaded with purpose 'batch'.",
        ));
    }
    if file.lines > inner.config.max_lines {
        return Err(ApiError::invalid(
            "input_file_id",
            format!(
                "The input file has {} requests; a batch may have at most {} ([batch] max_lines).",
                file.lines, inner.config.max_lines
            ),
        )
        .code("too_many_requests"));
    }
    let now = inner.now_secs();
    let mut batch = Batch::new(
        new_id("batch_"),
        endpoint,
        input_file_id,
        now,
        now + WINDOW_SECS,
    );
    batch.metadata = request.metadata;
    inner.store.insert_batch(owner, batch.clone()).await?;
    inner.lifecycle.notify_one();
    json(&batch)
}

pub(super) async fn get(inner: &Inner, owner: &str, id: &str) -> Answer {
    match inner.store.batch(owner, id).await? {
        Some(batch) => json(&batch),
        None => Err(ApiError::no_such("Batch", id).param("batch_id")),
    }
}

pub(super) async fn list(inner: &Inner, owner: &str, query: Option<&str>) -> Answer {
    let query = list_query(query, 20, 100)?;
    let limit = query.limit;
    let batches = inner.store.list_batches(owner, query).await?;
    json(&Page::new(batches, limit, |batch| &batch.id))
}

pub(super) async fn cancel(inner: &Inner, owner: &str, id: &str) -> Answer {
    match inner.store.cancel(owner, id, inner.now_secs()).await? {
        Cancel::Accepted(batch) => {
            inner.lifecycle.notify_one();
            json(&batch)
        }
        Cancel::Finished(batch) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Cannot cancel a batch with status '{}'.",
                batch.status.as_str()
            ),
        )),
        Cancel::NotFound => Err(ApiError::no_such("Batch", id).param("batch_id")),
    }
}
