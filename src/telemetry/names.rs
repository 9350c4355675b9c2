//! Attribute and event names on our spans: the OpenTelemetry semantic conventions (GenAI spans
//! as of semconv 1.37, where `gen_ai.provider.name` replaced `gen_ai.system`; HTTP; server) and
//! the proxy's own under `openrouter.`.

pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
pub const GEN_AI_REQUEST_STREAM: &str = "gen_ai.request.stream";
pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
pub const GEN_AI_RESPONSE_ID: &str = "gen_ai.response.id";
pub const GEN_AI_RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
pub const GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: &str = "gen_ai.response.time_to_first_chunk";
pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
/// Opt-in content (`capture_content = true`), JSON strings in the conventions' message shapes.
pub const GEN_AI_INPUT_MESSAGES: &str = "gen_ai.input.messages";
pub const GEN_AI_OUTPUT_MESSAGES: &str = "gen_ai.output.messages";
pub const GEN_AI_SYSTEM_INSTRUCTIONS: &str = "gen_ai.system_instructions";

pub const ERROR_TYPE: &str = "error.type";
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const URL_PATH: &str = "url.path";
pub const URL_FULL: &str = "url.full";
pub const URL_SCHEME: &str = "url.scheme";
pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";

pub const SERVICE_NAME: &str = "service.name";
pub const SERVICE_VERSION: &str = "service.version";

/// The proxy's route that matched.
pub const ROUTE: &str = "openrouter.route";
/// `HIT`, `MISS` or `BYPASS`.
pub const CACHE_RESULT: &str = "openrouter.cache.result";
/// Upstream attempts the request made.
pub const ATTEMPTS: &str = "openrouter.attempts";
/// On an attempt span: its number in the request, from 1.
pub const ATTEMPT: &str = "openrouter.attempt";
/// The upstream's name in the config.
pub const UPSTREAM: &str = "openrouter.upstream";
/// The model the answering attempt asked for (after the route's rewrite and fallbacks).
pub const SERVED_MODEL: &str = "openrouter.served_model";
pub const COST: &str = "openrouter.cost_usd";

/// The event on the request span when the first content byte goes to the client.
pub const FIRST_TOKEN: &str = "first_token";

/// `gen_ai.operation.name` of a request to `rest` (its path below `/v1`): `chat` for the chat
/// APIs (Chat Completions, Anthropic Messages, Responses), `text_completion`, `embeddings`, else
/// the path's last segment (`models`, `transcriptions`).
pub fn operation(rest: &str) -> &str {
    match rest {
        "/chat/completions" | "/messages" | "/responses" => "chat",
        "/completions" => "text_completion",
        "/embeddings" => "embeddings",
        _ => rest
            .trim_end_matches('/')
            .rsplit('/')
            .find(|segment| !segment.is_empty())
            .unwrap_or("http"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn operations_by_path() {
        for (path, operation) in [
            ("/chat/completions", "chat"),
            ("/messages", "chat"),
            ("/responses", "chat"),
            ("/completions", "text_completion"),
            ("/embeddings", "embeddings"),
            ("/models", "models"),
            ("/audio/transcriptions/", "transcriptions"),
            ("/", "http"),
            ("", "http"),
        ] {
            assert_eq!(super::operation(path), operation, "{path}");
        }
    }
}
