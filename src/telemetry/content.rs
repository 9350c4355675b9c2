//! Prompts and answers in the GenAI conventions' message shapes (`gen_ai.input.messages`,
//! `gen_ai.output.messages`, `gen_ai.system_instructions`), recorded only with
//! `capture_content = true`. Reads the OpenAI Chat, Completions, Embeddings and Responses bodies
//! and Anthropic Messages bodies; media and other non-text parts keep only their type.

use serde_json::{json, Map, Value};

/// What a request body says to the model, as JSON strings for span attributes.
#[derive(Debug, Default, PartialEq)]
pub struct Input {
    pub messages: Option<String>,
    pub system: Option<String>,
}

/// Reads `body`; a body that is not JSON, or has none of the known fields, gives nothing.
pub fn input(body: &[u8]) -> Input {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return Input::default();
    };
    let messages = match (body.get("messages"), body.get("prompt"), body.get("input")) {
        (Some(Value::Array(messages)), _, _) => Some(chat(messages)),
        (None, Some(prompt), _) => Some(texts(prompt)),
        (None, None, Some(Value::Array(items)))
            if items.iter().any(|i| i.get("role").is_some()) =>
        {
            Some(chat(items))
        }
        (None, None, Some(input)) => Some(texts(input)),
        _ => None,
    };
    let system = body
        .get("system")
        .or_else(|| body.get("instructions"))
        .map(parts);
    Input {
        messages: messages.map(|m| m.to_string()),
        system: system.map(|s| s.to_string()),
    }
}

/// One answer (a choice) as `gen_ai.output.messages`.
pub fn output(text: &str, finish_reason: &str) -> String {
    json!([{
        "role": "assistant",
        "parts": [{"type": "text", "content": text}],
        "finish_reason": finish_reason,
    }])
    .to_string()
}

/// The answer text of a complete JSON answer: a chat completion's first choice, a text
/// completion's, Anthropic's text blocks, the Responses API's `output_text` parts.
pub fn output_text(body: &[u8]) -> Option<String> {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let choice = answer.get("choices").and_then(|c| c.get(0));
    if let Some(choice) = choice {
        let text = choice
            .get("message")
            .and_then(|m| m.get("content"))
            .or_else(|| choice.get("text"));
        return text.and_then(Value::as_str).map(str::to_owned);
    }
    let blocks = match (answer.get("content"), answer.get("output")) {
        (Some(Value::Array(blocks)), _) => blocks.iter().collect::<Vec<_>>(),
        (None, Some(Value::Array(items))) => items
            .iter()
            .filter_map(|item| item.get("content").and_then(Value::as_array))
            .flatten()
            .collect(),
        _ => return None,
    };
    let texts: Vec<&str> = blocks
        .iter()
        .filter_map(|block| block.get("text").and_then(Value::as_str))
        .collect();
    (!texts.is_empty()).then(|| texts.concat())
}

/// A prompt (or embedding input): a string or a list of strings, each a user message.
fn texts(value: &Value) -> Value {
    let one = |text: &Value| json!({"role": "user", "parts": parts(text)});
    match value {
        Value::Array(items) => items.iter().map(one).collect(),
        other => json!([one(other)]),
    }
}

fn chat(messages: &[Value]) -> Value {
    messages
        .iter()
        .filter_map(Value::as_object)
        .map(|message| {
            let role = message.get("role").cloned().unwrap_or(json!("user"));
            let mut parts = match (message.get("tool_call_id"), message.get("content")) {
                (Some(id), content) => vec![json!({
                    "type": "tool_call_response",
                    "id": id,
                    "response": content.cloned().unwrap_or(Value::Null),
                })],
                (None, Some(content)) => parts_of(content),
                (None, None) => Vec::new(),
            };
            let calls = message.get("tool_calls").and_then(Value::as_array);
            parts.extend(calls.into_iter().flatten().map(tool_call));
            json!({"role": role, "parts": parts})
        })
        .collect()
}

fn parts(content: &Value) -> Value {
    Value::Array(parts_of(content))
}

fn parts_of(content: &Value) -> Vec<Value> {
    match content {
        Value::Null => Vec::new(),
        Value::Array(items) => items.iter().map(part).collect(),
        Value::String(text) => vec![json!({"type": "text", "content": text})],
        other => vec![json!({"type": "text", "content": other.to_string()})],
    }
}

/// One content block: OpenAI `text`/`input_text`/`output_text`, Anthropic `text`, `tool_use`
/// and `tool_result`; anything else (images, audio, files) by its type only.
fn part(block: &Value) -> Value {
    let kind = block.get("type").and_then(Value::as_str).unwrap_or("text");
    match (kind, block) {
        (_, Value::String(text)) => json!({"type": "text", "content": text}),
        ("tool_use", _) => json!({
            "type": "tool_call",
            "id": block.get("id"),
            "name": block.get("name"),
            "arguments": block.get("input"),
        }),
        ("tool_result", _) => json!({
            "type": "tool_call_response",
            "id": block.get("tool_use_id"),
            "response": block.get("content"),
        }),
        (_, _) => match block.get("text") {
            Some(text) => json!({"type": "text", "content": text}),
            None => Value::Object(Map::from_iter([("type".to_owned(), json!(kind))])),
        },
    }
}

/// An OpenAI `tool_calls` entry; its `arguments` string is decoded where it is JSON.
fn tool_call(call: &Value) -> Value {
    let function = call.get("function");
    let arguments = function.and_then(|f| f.get("arguments"));
    let arguments = match arguments {
        Some(Value::String(text)) => serde_json::from_str(text).unwrap_or(json!(text)),
        other => other.cloned().unwrap_or(Value::Null),
    };
    json!({
        "type": "tool_call",
        "id": call.get("id"),
        "name": function.and_then(|f| f.get("name")),
        "arguments": arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(body: Value) -> Value {
        let input = input(body.to_string().as_bytes());
        serde_json::from_str(&input.messages.unwrap()).unwrap()
    }

    #[test]
    fn chat_messages_with_tools() {
        let got = messages(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:..."}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]}));
        assert_eq!(
            got,
            json!([
                {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
                {"role": "user", "parts": [{"type": "text", "content": "hi"}, {"type": "image_url"}]},
                {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "f", "arguments": {"x": 1}}]},
                {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "42"}]},
            ])
        );
    }

    #[test]
    fn anthropic_system_and_blocks() {
        let body = json!({"model": "m", "system": "be kind", "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "g", "input": {"q": 1}}]},
        ]});
        let got = input(body.to_string().as_bytes());
        assert_eq!(
            got.system.as_deref(),
            Some(r#"[{"content":"be kind","type":"text"}]"#)
        );
        let messages: Value = serde_json::from_str(&got.messages.unwrap()).unwrap();
        assert_eq!(messages[0]["parts"][0]["type"], "tool_call_response");
        assert_eq!(messages[1]["parts"][0]["arguments"], json!({"q": 1}));
    }

    #[test]
    fn prompts_inputs_and_responses_items() {
        assert_eq!(
            messages(json!({"prompt": ["a", "b"]})),
            json!([
                {"role": "user", "parts": [{"type": "text", "content": "a"}]},
                {"role": "user", "parts": [{"type": "text", "content": "b"}]},
            ])
        );
        assert_eq!(
            messages(json!({"input": "embed me"})),
            json!([{"role": "user", "parts": [{"type": "text", "content": "embed me"}]}])
        );
        let responses = json!({"instructions": "sys", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "q"}]}]});
        let got = input(responses.to_string().as_bytes());
        assert!(got.system.unwrap().contains("sys"));
        assert_eq!(
            serde_json::from_str::<Value>(&got.messages.unwrap()).unwrap(),
            json!([{"role": "user", "parts": [{"type": "text", "content": "q"}]}])
        );
    }

    #[test]
    fn not_json_gives_nothing() {
        assert_eq!(input(b"not json"), Input::default());
        assert_eq!(input(b"{\"model\": \"m\"}"), Input::default());
    }

    #[test]
    fn answer_text_of_each_shape() {
        let text = |v: Value| output_text(v.to_string().as_bytes());
        let chat = json!({"choices": [{"message": {"role": "assistant", "content": "hi"}}]});
        assert_eq!(text(chat).as_deref(), Some("hi"));
        assert_eq!(
            text(json!({"choices": [{"text": "t"}]})).as_deref(),
            Some("t")
        );
        let messages =
            json!({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]});
        assert_eq!(text(messages).as_deref(), Some("ab"));
        let responses = json!({"output": [{"content": [{"type": "output_text", "text": "r"}]}]});
        assert_eq!(text(responses).as_deref(), Some("r"));
        assert_eq!(text(json!({"data": []})), None);
        assert_eq!(output_text(b"not json"), None);
    }

    #[test]
    fn output_is_one_assistant_choice() {
        let got: Value = serde_json::from_str(&output("hello", "stop")).unwrap();
        assert_eq!(
            got,
            json!([{"role": "assistant", "parts": [{"type": "text", "content": "hello"}], "finish_reason": "stop"}])
        );
    }
}
