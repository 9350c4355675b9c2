// The Batch API through the official OpenAI Node SDK: upload BATCH_INPUT, create a batch, poll it
// to completed and read its output. Run by tests/batch_proxy.rs with OPENAI_BASE_URL pointing at
// the proxy and OPENAI_NODE_MODULES at the node_modules folder holding the `openai` package.
const fs = require("node:fs");
const path = require("node:path");
const assert = require("node:assert/strict");
const OpenAI = require(path.join(process.env.OPENAI_NODE_MODULES, "openai"));

async function main() {
  const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: "unused-by-the-proxy", maxRetries: 0 });
  const input = process.env.BATCH_INPUT;
  const lines = fs.readFileSync(input, "utf8").trim().split("\n").length;
  const file = await client.files.create({ file: fs.createReadStream(input), purpose: "batch" });
  assert.equal(file.purpose, "batch");
  let batch = await client.batches.create({
    input_file_id: file.id,
    endpoint: "/v1/chat/completions",
    completion_window: "24h",
  });
  const deadline = Date.now() + 60_000;
  while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
    assert.ok(Date.now() < deadline, `batch still ${batch.status}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
    batch = await client.batches.retrieve(batch.id);
  }
  assert.equal(batch.status, "completed");
  assert.deepEqual(batch.request_counts, { total: lines, completed: lines, failed: 0 });
  const output = await (await client.files.content(batch.output_file_id)).text();
  const answers = output.trim().split("\n").map((line) => JSON.parse(line));
  assert.equal(answers.length, lines);
  for (const answer of answers) {
    assert.equal(answer.response.status_code, 200);
    assert.equal(answer.response.body.choices[0].message.content, `answer to ${answer.custom_id}`);
  }
  console.log("node batch: ok");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
