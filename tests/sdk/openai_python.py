"""Drives the proxy with the official OpenAI Python SDK, exactly as an application would.

Run by tests/sdk.rs with OPENAI_BASE_URL pointing at the proxy and a mock upstream behind it.
Exits non-zero (with the failing assertion) when the SDK sees anything unexpected.
"""

import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)

# Non-streaming chat through a routing rule: the alias is rewritten to the real model.
chat = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
assert chat.choices[0].message.content == "Hello from the mock", chat
assert chat.model == "openai/gpt-4o-mini", chat.model
assert chat.usage.total_tokens == 10, chat.usage

# Streaming chat with the final usage chunk.
stream = client.chat.completions.create(
    model="fast",
    messages=[{"role": "user", "content": "hi"}],
    stream=True,
    stream_options={"include_usage": True},
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert text == "Hello from the mock", text
assert finish == "stop", finish
assert usage is not None and usage.prompt_tokens == 7 and usage.completion_tokens == 4, usage

# Raw response headers tell which model answered.
raw = client.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "hi"}])
assert raw.headers["x-proxy-model"] == "openai/gpt-4o-mini", dict(raw.headers)

# Completions, embeddings and the model list pass through unchanged.
completion = client.completions.create(model="openai/gpt-3.5-turbo-instruct", prompt="say")
assert completion.choices[0].text == "completed", completion

embedding = client.embeddings.create(model="openai/text-embedding-3-small", input="hi", encoding_format="float")
assert embedding.data[0].embedding == [0.25, -0.5, 1.0], embedding

models = [m.id for m in client.models.list()]
assert models == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"], models

# A request the proxy refuses surfaces as the SDK's typed error with OpenAI's error body.
try:
    client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x" * 20000}])
except openai.APIStatusError as error:
    assert error.status_code == 413, error
    assert error.body["code"] == "body_too_large", error.body
else:
    raise AssertionError("an oversized body was accepted")

print("python sdk: ok")
