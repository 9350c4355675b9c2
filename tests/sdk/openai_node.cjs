// Drives the proxy with the official OpenAI Node SDK: one streaming chat, as an application would.
// Run by tests/sdk.rs with OPENAI_BASE_URL pointing at the proxy and OPENAI_NODE_MODULES at the
// node_modules folder holding the `openai` package.
const path = require("node:path");
const assert = require("node:assert/strict");
const OpenAI = require(path.join(process.env.OPENAI_NODE_MODULES, "openai"));

async function main() {
  const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: "unused-by-the-proxy", maxRetries: 0 });
  const stream = await client.chat.completions.create({
    model: "fast",
    messages: [{ role: "user", content: "hi" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length > 0) text += chunk.choices[0].delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(text, "Hello from the mock");
  assert.equal(usage.prompt_tokens, 7);
  console.log("node sdk: ok");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
