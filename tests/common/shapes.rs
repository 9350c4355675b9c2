//! Mock answers in the API shapes OpenRouter serves besides chat: Anthropic Messages and the
//! OpenAI Responses API, as JSON and as event streams that end exactly at the shape's last event.

use serde_json::{json, Value};

use super::{Recorded, Reply};

/// The words every streamed mock answer is made of, and the text they add up to.
pub const WORDS: [&str; 4] = ["Hello", " from", " the", " mock"];
pub const TEXT: &str = "Hello from the mock";

/// Usage the Messages mock reports: prompt 11 (+ 2 read from the cache), output 5 at the end.
pub const MESSAGES_PROMPT: u64 = 13;
pub const MESSAGES_OUTPUT: u64 = 5;
/// Usage the Responses mock reports.
pub const RESPONSES_INPUT: u64 = 9;
pub const RESPONSES_OUTPUT: u64 = 4;

/// One named SSE event, as Anthropic and the Responses API send them.
pub fn named_event(kind: &str, data: &Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

pub fn anthropic_message(model: &str, text: &str) -> String {
    json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 11, "cache_read_input_tokens": 2, "output_tokens": MESSAGES_OUTPUT,
                  "cost": 0.0003}
    })
    .to_string()
}

/// `{"type": "error", "error": {"type": kind, "message": ...}}`.
pub fn anthropic_error(kind: &str) -> String {
    json!({"type": "error", "error": {"type": kind, "message": format!("mock {kind}")}}).to_string()
}

/// A streamed message up to (and including) its first content delta.
pub fn anthropic_opening(model: &str) -> Vec<String> {
    vec![
        named_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 11, "cache_read_input_tokens": 2, "output_tokens": 1}}}),
        ),
        named_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        named_event("ping", &json!({"type": "ping"})),
        anthropic_delta(WORDS[0]),
    ]
}

pub fn anthropic_delta(text: &str) -> String {
    named_event(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}),
    )
}

/// A whole streamed message, ending at `message_stop` with nothing after it.
pub fn anthropic_stream(model: &str) -> Vec<String> {
    let mut events = anthropic_opening(model);
    events.extend(WORDS[1..].iter().map(|word| anthropic_delta(word)));
    events.push(named_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(named_event(
        "message_delta",
        &json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": MESSAGES_OUTPUT, "cost": 0.0003}}),
    ));
    events.push(named_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    events
}

fn response_object(model: &str, status: &str, output: Value, usage: Value) -> Value {
    json!({
        "id": "resp_1", "object": "response", "created_at": 1, "status": status, "model": model,
        "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        "error": null, "incomplete_details": null, "usage": usage
    })
}

fn output_message(text: &str, status: &str) -> Value {
    let content = if text.is_empty() {
        json!([])
    } else {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    };
    json!({"id": "msg_1", "type": "message", "status": status, "role": "assistant",
           "content": content})
}

fn responses_usage() -> Value {
    json!({"input_tokens": RESPONSES_INPUT, "output_tokens": RESPONSES_OUTPUT,
           "total_tokens": RESPONSES_INPUT + RESPONSES_OUTPUT,
           "input_tokens_details": {"cached_tokens": 0},
           "output_tokens_details": {"reasoning_tokens": 0}, "cost": 0.0002})
}

/// A complete (non-streamed) response object.
pub fn responses_object(model: &str, text: &str) -> String {
    let output = json!([output_message(text, "completed")]);
    response_object(model, "completed", output, responses_usage()).to_string()
}

/// A streamed response up to (and including) its first text delta.
pub fn responses_opening(model: &str) -> Vec<String> {
    let created = response_object(model, "in_progress", json!([]), Value::Null);
    vec![
        named_event(
            "response.created",
            &json!({"type": "response.created", "sequence_number": 0, "response": created}),
        ),
        named_event(
            "response.in_progress",
            &json!({"type": "response.in_progress", "sequence_number": 1, "response": created}),
        ),
        named_event(
            "response.output_item.added",
            &json!({"type": "response.output_item.added", "sequence_number": 2,
                    "output_index": 0, "item": output_message("", "in_progress")}),
        ),
        named_event(
            "response.content_part.added",
            &json!({"type": "response.content_part.added", "sequence_number": 3,
                    "item_id": "msg_1", "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
        responses_delta(4, WORDS[0]),
    ]
}

pub fn responses_delta(sequence: usize, text: &str) -> String {
    named_event(
        "response.output_text.delta",
        &json!({"type": "response.output_text.delta", "sequence_number": sequence,
                "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": text,
                "logprobs": []}),
    )
}

/// A whole streamed response, ending at `response.completed` with nothing after it.
pub fn responses_stream(model: &str) -> Vec<String> {
    let mut events = responses_opening(model);
    for (i, word) in WORDS[1..].iter().enumerate() {
        events.push(responses_delta(5 + i, word));
    }
    let part = json!({"type": "output_text", "text": TEXT, "annotations": []});
    let place = json!({"item_id": "msg_1", "output_index": 0, "content_index": 0});
    let with = |mut value: Value, extra: &Value| {
        for (key, field) in extra.as_object().into_iter().flatten() {
            value[key] = field.clone();
        }
        value
    };
    events.push(named_event(
        "response.output_text.done",
        &with(
            json!({"type": "response.output_text.done", "sequence_number": 8, "text": TEXT,
                   "logprobs": []}),
            &place,
        ),
    ));
    events.push(named_event(
        "response.content_part.done",
        &with(
            json!({"type": "response.content_part.done", "sequence_number": 9, "part": part}),
            &place,
        ),
    ));
    events.push(named_event(
        "response.output_item.done",
        &json!({"type": "response.output_item.done", "sequence_number": 10, "output_index": 0,
                "item": output_message(TEXT, "completed")}),
    ));
    let done = response_object(
        model,
        "completed",
        json!([output_message(TEXT, "completed")]),
        responses_usage(),
    );
    events.push(named_event(
        "response.completed",
        &json!({"type": "response.completed", "sequence_number": 11, "response": done}),
    ));
    events
}

/// A Responses stream that fails before any output.
pub fn responses_failed(model: &str) -> Vec<String> {
    let created = response_object(model, "in_progress", json!([]), Value::Null);
    let mut failed = response_object(model, "failed", json!([]), Value::Null);
    failed["error"] = json!({"code": "server_error", "message": "mock failure"});
    vec![
        named_event(
            "response.created",
            &json!({"type": "response.created", "sequence_number": 0, "response": created}),
        ),
        named_event(
            "response.failed",
            &json!({"type": "response.failed", "sequence_number": 1, "response": failed}),
        ),
    ]
}

/// OpenRouter-like answers on the Messages and Responses paths (`None` for other paths). The last
/// word of the model decides the behaviour: `*-overloaded` fails before content (529 or 503, or
/// an error event in a stream), `*-failing` answers 200 with an error body (or a failed stream),
/// `*-refused` is the client's own error (400), `*-cut` ends its stream after the first content,
/// before the shape's last event, `*-trailing` ends a Responses stream with `data: [DONE]`; any other model answers
/// normally.
pub fn shape_reply(request: &Recorded) -> Option<Reply> {
    let path = request.path_and_query.split('?').next().unwrap_or("");
    let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let model = body["model"].as_str().unwrap_or("none").to_owned();
    let stream = body["stream"] == true;
    let behaviour = model.rsplit(['/', '-']).next().unwrap_or("");
    Some(match (path, behaviour, stream) {
        ("/api/v1/messages/count_tokens", _, _) => {
            Reply::Json(200, json!({"input_tokens": 12}).to_string())
        }
        ("/api/v1/messages", "overloaded", false) => {
            Reply::Json(529, anthropic_error("overloaded_error"))
        }
        ("/api/v1/messages", "overloaded", true) => {
            let mut events = anthropic_opening(&model);
            events.truncate(3);
            let error = serde_json::from_str(&anthropic_error("overloaded_error")).unwrap();
            events.push(named_event("error", &error));
            Reply::Sse(events)
        }
        ("/api/v1/messages", "failing", _) => Reply::Json(200, anthropic_error("api_error")),
        ("/api/v1/messages" | "/api/v1/responses", "refused", _) => {
            Reply::Json(400, anthropic_error("invalid_request_error"))
        }
        ("/api/v1/messages", "cut", _) => Reply::Sse(anthropic_opening(&model)),
        ("/api/v1/messages", _, true) => Reply::Sse(anthropic_stream(&model)),
        ("/api/v1/messages", _, false) => Reply::Json(200, anthropic_message(&model, TEXT)),
        ("/api/v1/responses", "failing", true) => Reply::Sse(responses_failed(&model)),
        ("/api/v1/responses", "overloaded", true) => {
            let mut events = responses_failed(&model);
            let error = json!({"type": "error", "code": "server_error", "message": "mock error",
                               "param": null, "sequence_number": 1});
            events[1] = named_event("error", &error);
            Reply::Sse(events)
        }
        ("/api/v1/responses", "trailing", true) => {
            let mut events = responses_stream(&model);
            events.push("data: [DONE]\n\n".to_owned());
            Reply::Sse(events)
        }
        ("/api/v1/responses", "overloaded", false) => Reply::Json(
            503,
            json!({"error": {"message": "mock overloaded", "code": 503}}).to_string(),
        ),
        ("/api/v1/responses", "failing", false) => {
            let mut failed: Value = serde_json::from_str(&responses_object(&model, "")).unwrap();
            failed["status"] = json!("failed");
            failed["error"] = json!({"code": "server_error", "message": "mock failure"});
            Reply::Json(200, failed.to_string())
        }
        ("/api/v1/responses", "cut", _) => Reply::Sse(responses_opening(&model)),
        ("/api/v1/responses", _, true) => Reply::Sse(responses_stream(&model)),
        ("/api/v1/responses", _, false) => Reply::Json(200, responses_object(&model, TEXT)),
        _ => return None,
    })
}
