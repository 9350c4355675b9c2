// Bodies over the proxy's limit, sent with the official OpenAI Node SDK (no retries): every one
// must come back as the proxy's 413 error, never as a connection error. Run by tests/sdk.rs.
const path = require("node:path");
const assert = require("node:assert/strict");
const OpenAI = require(path.join(process.env.OPENAI_NODE_MODULES, "openai"));

async function main() {
  const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: "unused-by-the-proxy", maxRetries: 0 });
  const big = "x".repeat(5 * 1000 * 1000);
  for (let i = 0; i < 15; i++) {
    try {
      await client.chat.completions.create({ model: "fast", messages: [{ role: "user", content: big }] });
      assert.fail("an oversized body was accepted");
    } catch (error) {
      assert.ok(error instanceof OpenAI.APIError, `request ${i}: ${error}`);
      assert.equal(error.status, 413, `request ${i}: ${error}`);
      assert.equal(error.code, "body_too_large");
    }
  }
  console.log("node sdk: 15 of 15 oversized bodies answered 413");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
