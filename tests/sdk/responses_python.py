"""Drives the proxy's Responses API path with the official OpenAI Python SDK (OPENAI_BASE_URL
pointing at the proxy). Run by tests/shapes.rs against a mock that speaks the Responses API;
exits non-zero with the failing assertion when the SDK sees anything unexpected.
"""

from openai import OpenAI

client = OpenAI(api_key="unused-by-the-proxy", max_retries=0)
TEXT = "Hello from the mock"

# A plain answer through a routing rule.
response = client.responses.create(model="sdk-gpt", input="hi")
assert response.output_text == TEXT, response
assert response.model == "openai/sdk-gpt", response.model
assert response.usage.input_tokens == 9 and response.usage.output_tokens == 4, response.usage

# A stream: every event up to `response.completed`, and nothing the proxy adds after it (an
# appended error event would make the SDK raise here).
with client.responses.stream(model="sdk-gpt", input="hi") as stream:
    types = [event.type for event in stream]
    final = stream.get_final_response()
assert types[-1] == "response.completed", types
assert final.output_text == TEXT, final
raw = [event.type for event in client.responses.create(model="sdk-gpt", input="hi", stream=True)]
assert raw == types, (raw, types)

# A first model that fails before any output falls back to the second, streamed or not.
response = client.responses.create(model="sdk-gpt-fallback", input="hi")
assert response.model == "openai/sdk-backup" and response.output_text == TEXT, response
with client.responses.stream(model="sdk-gpt-fallback", input="hi") as stream:
    types = [event.type for event in stream]
    final = stream.get_final_response()
assert "response.failed" not in types, types
assert final.model == "openai/sdk-backup" and final.output_text == TEXT, final

# A stream cut after content ends with the Responses API's error event, and never completes.
with client.responses.stream(model="sdk-gpt-cut", input="hi") as stream:
    events = list(stream)
    try:
        stream.get_final_response()
    except RuntimeError:
        pass
    else:
        raise AssertionError("a broken stream produced a final response")
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert deltas == "Hello", deltas
assert events[-1].type == "error", [e.type for e in events]
assert events[-1].code == "upstream_stream_error", events[-1]
assert "upstream stream failed" in events[-1].message, events[-1]

print("responses sdk: ok")
