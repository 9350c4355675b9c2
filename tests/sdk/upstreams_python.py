"""The default upstream (OpenRouter) is down: the official OpenAI Python SDK still gets its
answers, from the route's last fallback on a second upstream, streaming and not, and the response
headers say which upstream and model answered.

Run by tests/upstreams.rs with OPENAI_BASE_URL pointing at the proxy; the route "smart" names a
model on the default upstream first and { upstream = "backup", model = "llama-local" } last.
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)
messages = [{"role": "user", "content": "hi"}]

raw = client.chat.completions.with_raw_response.create(model="smart", messages=messages)
assert raw.headers["x-proxy-upstream"] == "backup", dict(raw.headers)
assert raw.headers["x-proxy-model"] == "llama-local", dict(raw.headers)
chat = raw.parse()
assert chat.choices[0].message.content == "Hello from the mock", chat
assert chat.model == "llama-local", chat.model

raw = client.chat.completions.with_raw_response.create(
    model="smart",
    messages=messages,
    stream=True,
    stream_options={"include_usage": True},
)
assert raw.headers["x-proxy-upstream"] == "backup", dict(raw.headers)
assert raw.headers["x-proxy-model"] == "llama-local", dict(raw.headers)
text, usage = "", None
for chunk in raw.parse():
    if chunk.choices:
        assert chunk.model == "llama-local", chunk
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text == "Hello from the mock", text
assert usage is not None and usage.completion_tokens == 4, usage
print("python sdk: answered by the backup upstream, streaming and not")
