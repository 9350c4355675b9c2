"""A stream that breaks after content must make the official OpenAI Python SDK raise, not end
quietly as if the answer were complete. Run by tests/sdk.rs."""

import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)
stream = client.chat.completions.create(model="breaks", messages=[{"role": "user", "content": "hi"}], stream=True)
received = ""
try:
    for chunk in stream:
        if chunk.choices:
            received += chunk.choices[0].delta.content or ""
except openai.APIError as error:
    assert received == "partial", received
    assert "upstream stream failed" in str(error), error
    print("python sdk raised:", error)
else:
    raise AssertionError(f"the SDK accepted a broken stream as complete: {received!r}")
