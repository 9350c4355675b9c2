//! The HTTP face of the Batch API: routes `/v1/files...` and `/v1/batches...` to their handlers
//! and renders their answers and errors in OpenAI's JSON shapes.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;

use super::body::{full, ApiBody};
use super::model::ListQuery;
use super::store::StoreError;
use super::Inner;

mod batches;
mod files;

/// A request path of the Batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Files,
    File(&'a str),
    FileContent(&'a str),
    Batches,
    Batch(&'a str),
    Cancel(&'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "files"] => Some(Route::Files),
        ["v1", "files", id] => Some(Route::File(id)),
        ["v1", "files", id, "content"] => Some(Route::FileContent(id)),
        ["v1", "batches"] => Some(Route::Batches),
        ["v1", "batches", id] => Some(Route::Batch(id)),
        ["v1", "batches", id, "cancel"] => Some(Route::Cancel(id)),
        _ => None,
    }
}

pub(super) async fn handle<B>(inner: &Inner, owner: &str, request: Request<B>) -> Response<ApiBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    let query = parts.uri.query();
    let answer = match (route(parts.uri.path()), &parts.method) {
        (Some(Route::Files), &Method::POST) => {
            files::upload(inner, owner, &parts.headers, body).await
        }
        (Some(Route::Files), &Method::GET) => files::list(inner, owner, query).await,
        (Some(Route::File(id)), &Method::GET) => files::get(inner, owner, id).await,
        (Some(Route::File(id)), &Method::DELETE) => files::delete(inner, owner, id).await,
        (Some(Route::FileContent(id)), &Method::GET) => files::content(inner, owner, id).await,
        (Some(Route::Batches), &Method::POST) => batches::create(inner, owner, body).await,
        (Some(Route::Batches), &Method::GET) => batches::list(inner, owner, query).await,
        (Some(Route::Batch(id)), &Method::GET) => batches::get(inner, owner, id).await,
        (Some(Route::Cancel(id)), &Method::POST) => batches::cancel(inner, owner, id).await,
        (Some(_), method) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not supported on this path."),
        )),
        (None, _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "Unknown Files or Batches API path.",
        )),
    };
    answer.unwrap_or_else(ApiError::into_response)
}

/// An error answer: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400: the request is wrong in `param`.
    fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message).param(param)
    }

    fn missing(param: &'static str) -> ApiError {
        ApiError::invalid(param, format!("Missing required parameter: '{param}'."))
            .code("missing_required_parameter")
    }

    /// 404 for an object that does not exist, or belongs to another owner.
    fn no_such(kind: &str, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No such {kind} object: {id}"),
        )
    }

    fn param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        }
    }

    fn into_response(self) -> Response<ApiBody> {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        });
        respond(self.status, body.to_string().into_bytes())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        if error.is_unavailable() {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The batch store (Redis) cannot be reached; try again shortly.",
            )
            .code("store_unavailable");
        }
        tracing::error!(%error, "the batch store failed a request");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The batch store failed; try again.",
        )
        .code("store_error")
    }
}

type Answer = Result<Response<ApiBody>, ApiError>;

fn respond(status: StatusCode, json: Vec<u8>) -> Response<ApiBody> {
    let mut response = Response::new(full(json));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json(value: &impl Serialize) -> Answer {
    let body = serde_json::to_vec(value).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {error}"),
        )
    })?;
    Ok(respond(StatusCode::OK, body))
}

/// `limit`, `after`, `order` and `purpose` of a list request. Ids and purposes are plain ASCII,
/// so no percent-decoding is needed for them to match.
fn list_query(
    query: Option<&str>,
    default_limit: usize,
    max_limit: usize,
) -> Result<ListQuery, ApiError> {
    let mut list = ListQuery {
        limit: default_limit,
        ..ListQuery::default()
    };
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "limit" => {
                list.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=max_limit).contains(limit))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "limit",
                            format!("'limit' must be an integer between 1 and {max_limit}."),
                        )
                    })?;
            }
            "after" => list.after = Some(value.to_owned()),
            "order" => list.ascending = value == "asc",
            "purpose" => list.purpose = Some(value.to_owned()),
            _ => {}
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_recognised() {
        assert_eq!(route("/v1/files"), Some(Route::Files));
        assert_eq!(route("/v1/files/"), Some(Route::Files));
        assert_eq!(route("/v1/files/file-1"), Some(Route::File("file-1")));
        assert_eq!(
            route("/v1/files/file-1/content"),
            Some(Route::FileContent("file-1"))
        );
        assert_eq!(route("/v1/batches/b/cancel"), Some(Route::Cancel("b")));
        assert_eq!(route("/v1/batches/b/other"), None);
    }

    #[test]
    fn list_queries_are_bounded() {
        let list = list_query(Some("limit=5&after=batch_1&order=asc"), 20, 100).unwrap();
        assert_eq!(list.limit, 5);
        assert_eq!(list.after.as_deref(), Some("batch_1"));
        assert!(list.ascending);
        assert_eq!(list_query(None, 20, 100).unwrap().limit, 20);
        assert!(list_query(Some("limit=0"), 20, 100).is_err());
        assert!(list_query(Some("limit=101"), 20, 100).is_err());
    }
}
