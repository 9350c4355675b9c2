"""Uploads through the proxy with the official OpenAI Python SDK, sync and async: an 11 MB file
(over the proxy's JSON body limit, accepted by the OpenAI API) and an audio transcription whose
form names the model to route on. Run by tests/sdk.rs."""

import asyncio
import os

from openai import AsyncOpenAI, OpenAI

BIG = bytes(range(256)) * (11 * 1024 * 1024 // 256)

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)
uploaded = client.files.create(file=("big.jsonl", BIG), purpose="batch")
assert uploaded.bytes == len(BIG), uploaded
transcript = client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF" + BIG[:4096]))
assert transcript.text == "hello from the mock", transcript


async def main():
    aclient = AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused-by-the-proxy", max_retries=0)
    uploaded = await aclient.files.create(file=("big.jsonl", BIG), purpose="batch")
    assert uploaded.bytes == len(BIG), uploaded


asyncio.run(main())
print("python sdk uploads: ok")
