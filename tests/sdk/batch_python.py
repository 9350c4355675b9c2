"""The Batch API through the official OpenAI Python SDK, as an application would use it: upload a
JSONL file, create a batch, poll it, cancel it, download its output and error files. Run by
tests/batch.rs, which prepares the input files and checks the printed summary against what the
mock upstream saw.

Usage (OPENAI_BASE_URL points at the server; OPENAI_API_KEY is the caller, i.e. the owner):
  run INPUT                      upload, create, wait until the batch ends, summarize
  create INPUT                   upload and create; print {"batch_id", "file_id"}
  cancel BATCH_ID                cancel; print the batch
  wait BATCH_ID                  wait until the batch ends; summarize
  pages INPUT COUNT              create COUNT batches from INPUT, list them 2 per page
  foreign BATCH_ID FILE_ID       as another caller: every call on these objects is a 404
  limits BIG SMALL               a too large upload is a 413; a file over max_lines a 400
"""

import json
import os
import sys
import time

import openai
from openai import OpenAI

ENDPOINT = "/v1/chat/completions"
FINAL = {"completed", "failed", "expired", "cancelled"}
PATIENCE = 60.0

client = OpenAI(max_retries=0)


def create(path):
    with open(path, "rb") as f:
        uploaded = client.files.create(file=("input.jsonl", f), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch", uploaded
    assert uploaded.bytes == os.path.getsize(path), uploaded
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=ENDPOINT,
        completion_window="24h",
        metadata={"purpose": "test"},
    )
    assert batch.object == "batch" and batch.status == "validating", batch
    assert batch.input_file_id == uploaded.id and batch.metadata == {"purpose": "test"}, batch
    return batch, uploaded


def content(file_id):
    if file_id is None:
        return None
    return client.files.content(file_id).text


def wait(batch_id):
    deadline = time.monotonic() + PATIENCE
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.02)


def cancel(batch_id):
    batch = client.batches.cancel(batch_id)
    assert batch.status in ("cancelling", "cancelled") and batch.cancelling_at, batch
    return batch.model_dump()


def summarize(batch):
    files = {f.id for f in client.files.list()}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            assert file_id in files, (file_id, files)
            assert client.files.retrieve(file_id).purpose == "batch_output"
    return {
        "batch": batch.model_dump(),
        "output": content(batch.output_file_id),
        "error": content(batch.error_file_id),
    }


def pages(path, count):
    ids = [create(path)[0].id for _ in range(count)]
    first = client.batches.list(limit=2)
    assert first.has_more and len(first.data) == 2, first
    listed = [b.id for b in client.batches.list(limit=2)]  # auto-paginates with `after`
    assert listed == list(reversed(ids)), (listed, ids)
    return {"ids": ids}


def expect_status(status, call):
    try:
        call()
    except openai.APIStatusError as error:
        assert error.status_code == status, (status, error)
        return error.body
    raise AssertionError(f"expected {status}")


def foreign(batch_id, file_id):
    for call in (
        lambda: client.batches.retrieve(batch_id),
        lambda: client.batches.cancel(batch_id),
        lambda: client.files.retrieve(file_id),
        lambda: client.files.content(file_id),
        lambda: client.files.delete(file_id),
    ):
        body = expect_status(404, call)
        assert body["type"] == "invalid_request_error", body
    assert client.batches.list().data == []
    assert client.files.list().data == []
    return {"ok": True}


def limits(big, small):
    with open(big, "rb") as f:
        too_large = expect_status(413, lambda: client.files.create(file=("big.jsonl", f), purpose="batch"))
    with open(small, "rb") as f:
        uploaded = client.files.create(file=("many.jsonl", f), purpose="batch")
    too_many = expect_status(
        400,
        lambda: client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"),
    )
    wrong = expect_status(
        400,
        lambda: client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"),
    )
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id, deleted
    expect_status(404, lambda: client.files.retrieve(uploaded.id))
    return {"too_large": too_large, "too_many": too_many, "wrong_endpoint": wrong}


def main(args):
    command = args[0]
    if command == "run":
        batch, _ = create(args[1])
        return summarize(wait(batch.id))
    if command == "create":
        batch, uploaded = create(args[1])
        return {"batch_id": batch.id, "file_id": uploaded.id}
    if command == "cancel":
        return cancel(args[1])
    if command == "wait":
        return summarize(wait(args[1]))
    if command == "pages":
        return pages(args[1], int(args[2]))
    if command == "foreign":
        return foreign(args[1], args[2])
    if command == "limits":
        return limits(args[1], args[2])
    raise SystemExit(f"unknown command {command}")


print(json.dumps(main(sys.argv[1:])))
