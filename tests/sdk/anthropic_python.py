"""Drives the proxy's Messages path with the official Anthropic Python SDK, as Claude Code and
Anthropic apps do: only ANTHROPIC_BASE_URL points at the proxy, and the client's own key goes in
x-api-key (the proxy replaces it). Run by tests/shapes.rs against a mock that speaks Messages;
exits non-zero with the failing assertion when the SDK sees anything unexpected.
"""

import anthropic

client = anthropic.Anthropic(api_key="sk-ant-client-key-must-not-leak", max_retries=0)
ask = {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
TEXT = "Hello from the mock"

# A plain answer through a routing rule: the alias is rewritten to the real model.
message = client.messages.create(model="sdk-claude", **ask)
assert message.content[0].text == TEXT, message
assert message.model == "anthropic/sdk-claude", message.model
assert message.usage.output_tokens == 5, message.usage

# A stream: the text, the final message and its usage, nothing after `message_stop`.
with client.messages.stream(model="sdk-claude", **ask) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == TEXT, text
assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5, final

# An overloaded first model falls back to the second before any content, streamed or not.
message = client.messages.create(model="sdk-claude-fallback", **ask)
assert message.model == "anthropic/sdk-backup" and message.content[0].text == TEXT, message
with client.messages.stream(model="sdk-claude-fallback", **ask) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == TEXT and final.model == "anthropic/sdk-backup", final

# A stream cut after content ends with an Anthropic error event, on which the SDK raises.
received = ""
try:
    with client.messages.stream(model="sdk-claude-cut", **ask) as stream:
        for piece in stream.text_stream:
            received += piece
except anthropic.APIError as error:
    assert received == "Hello", received
    assert error.body["type"] == "error", error.body
    assert error.body["error"]["type"] == "api_error", error.body
    assert "upstream stream failed" in error.body["error"]["message"], error.body
else:
    raise AssertionError(f"the SDK accepted a broken stream as complete: {received!r}")

# Token counting passes through.
count = client.messages.count_tokens(model="sdk-claude", messages=ask["messages"])
assert count.input_tokens == 12, count

# An error of the proxy's own comes in Anthropic's shape, so the SDK shows it.
try:
    client.messages.create(model="sdk-claude", max_tokens=64, messages=[{"role": "user", "content": "x" * 30000}])
except anthropic.APIStatusError as error:
    assert error.status_code == 413, error
    assert error.body["type"] == "error", error.body
    assert error.body["error"]["type"] == "request_too_large", error.body
else:
    raise AssertionError("an oversized body was accepted")

print("anthropic sdk: ok")
