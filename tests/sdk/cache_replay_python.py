"""A streamed answer served from the cache reaches the official OpenAI Python SDK exactly as the
original did: same chunks, same text, same usage. Run by tests/sdk.rs."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)


def stream_once():
    raw = client.chat.completions.with_raw_response.create(
        model="cached",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk.model_dump() for chunk in raw.parse()]
    return raw.headers.get("x-cache"), chunks


first_cache, first = stream_once()
second_cache, second = stream_once()
assert (first_cache, second_cache) == ("MISS", "HIT"), (first_cache, second_cache)
assert first == second, (first, second)
text = "".join(c["choices"][0]["delta"]["content"] or "" for c in second if c["choices"])
assert text == "Hello from the mock", text
assert second[-1]["usage"]["completion_tokens"] == 4, second[-1]
print("python sdk: cached stream replayed identically")
