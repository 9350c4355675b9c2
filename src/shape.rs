//! The API shapes the proxy understands, and which request speaks which: OpenAI chat and text
//! completions, Anthropic Messages, and the OpenAI Responses API. A shape decides how answers are
//! classified (see `sse`) and how the proxy's own errors are rendered (see `error`).

use http::Method;

/// How a request's answers and errors look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// OpenAI chat/completions and completions: `data:` events ending with `data: [DONE]`, errors
    /// as `{"error": {...}}`. Also every path the proxy does not otherwise understand.
    #[default]
    Chat,
    /// Anthropic Messages (`/v1/messages` and the paths under it): named events ending with
    /// `message_stop`, errors as `{"type": "error", "error": {"type", "message"}}`.
    Messages,
    /// The OpenAI Responses API (`POST /v1/responses`): named events ending with
    /// `response.completed`, errors as `{"error": {...}}` and, in a stream, `{"type": "error"}`.
    Responses,
}

impl Shape {
    /// The shape of a request for the client's full `path` (e.g. `/v1/messages`).
    pub fn of(method: &Method, path: &str) -> Shape {
        let Some(rest) = path.strip_prefix("/v1") else {
            return Shape::Chat;
        };
        if rest == "/messages" || rest.starts_with("/messages/") {
            Shape::Messages
        } else if rest == "/responses" && method == Method::POST {
            Shape::Responses
        } else {
            Shape::Chat
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_their_shapes() {
        let post = Method::POST;
        assert_eq!(Shape::of(&post, "/v1/chat/completions"), Shape::Chat);
        assert_eq!(Shape::of(&post, "/v1/messages"), Shape::Messages);
        assert_eq!(
            Shape::of(&post, "/v1/messages/count_tokens"),
            Shape::Messages
        );
        assert_eq!(Shape::of(&post, "/v1/messagesx"), Shape::Chat);
        assert_eq!(Shape::of(&post, "/v1/responses"), Shape::Responses);
        // Retrieving or deleting a stored response is plain JSON, not a generation.
        assert_eq!(Shape::of(&Method::GET, "/v1/responses"), Shape::Chat);
        assert_eq!(
            Shape::of(&Method::DELETE, "/v1/responses/resp_1"),
            Shape::Chat
        );
        assert_eq!(Shape::of(&post, "/messages"), Shape::Chat);
    }
}
