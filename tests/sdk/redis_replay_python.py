"""Streams one chat completion through the official OpenAI Python SDK from the replica at
OPENAI_BASE_URL and prints what the client saw as JSON: the cache headers and every chunk. Run by
tests/redis_e2e.rs against two replicas sharing Redis, which compares the two outputs."""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)

raw = client.chat.completions.with_raw_response.create(
    model="cached",
    messages=[{"role": "user", "content": os.environ["PROMPT"]}],
    stream=True,
    stream_options={"include_usage": True},
)
chunks = [chunk.model_dump() for chunk in raw.parse()]
text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
assert text == "Hello from the mock", text
print(json.dumps({
    "cache": raw.headers.get("x-cache"),
    "tier": raw.headers.get("x-cache-tier"),
    "chunks": chunks,
}))
