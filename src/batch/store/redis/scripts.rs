//! The Lua scripts that make each change of the Redis store atomic.

/// Runs a list of commands only if a hash field holds an expected value (no check when the
/// field name is empty). `KEYS[1]` the hash; `ARGV[1]` the field, `ARGV[2]` the value; then each
/// command as its argument count followed by its arguments. A command whose name starts with `?`
/// may fail without stopping the rest (creating a consumer group that exists). Returns 1 when the
/// commands ran, 0 when the check failed.
pub(super) const GUARDED: &str = r"
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local name = ARGV[i + 1]
  if string.sub(name, 1, 1) == '?' then
    redis.pcall(string.sub(name, 2), unpack(ARGV, i + 2, i + n))
  else
    redis.call(unpack(ARGV, i + 1, i + n))
  end
  i = i + n + 1
end
return 1
";

/// Takes (or keeps) the right to validate a batch: `KEYS[1]` the batch; `ARGV` the consumer,
/// now and the claim's end (Unix milliseconds). A claim of another replica stands until it ends.
pub(super) const CLAIM_VALIDATION: &str = r"
local b = redis.call('HMGET', KEYS[1], 'status', 'validator', 'validator_until')
if b[1] ~= 'validating' then return 0 end
if b[2] and b[2] ~= ARGV[1] and tonumber(b[3]) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'validator', ARGV[1], 'validator_until', ARGV[3])
return 1
";

/// Leases a running batch's next lines. KEYS: batch, stream, due, state, holder, custom ids,
/// bodies, attempts, entries. ARGV: now (ms), max, claim_after (ms), consumer, lease token.
/// Retries that are due go back on the stream; entries held by a consumer idle longer than
/// `claim_after` are claimed first, then new entries are read. Returns `{line, custom_id, body,
/// attempts}` for each line leased.
pub(super) const LEASE: &str = r"
local b = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
local now = tonumber(ARGV[1])
if b[1] ~= 'in_progress' or tonumber(b[2]) * 1000 <= now then return {} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {} end
local max = tonumber(ARGV[2])
for _, line in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, max)) do
  redis.call('XADD', KEYS[2], '*', 'l', line)
  redis.call('ZREM', KEYS[3], line)
end
local entries = {}
local claimed = redis.call('XAUTOCLAIM', KEYS[2], 'w', ARGV[4], ARGV[3], '0-0', 'COUNT', max)
for _, e in ipairs(claimed[2]) do
  if e then table.insert(entries, e) end
end
if #entries < max then
  local read = redis.call('XREADGROUP', 'GROUP', 'w', ARGV[4], 'COUNT', max - #entries,
    'STREAMS', KEYS[2], '>')
  if read then
    for _, e in ipairs(read[1][2]) do table.insert(entries, e) end
  end
end
local out = {}
for _, e in ipairs(entries) do
  local line = e[2][2]
  local state = redis.call('HGET', KEYS[4], line)
  if state == 'pending' or state == 'leased' or state == 'retry_at' then
    redis.call('HSET', KEYS[4], line, 'leased')
    redis.call('HSET', KEYS[5], line, ARGV[5])
    redis.call('HSET', KEYS[9], line, e[1])
    table.insert(out, {line, redis.call('HGET', KEYS[6], line), redis.call('HGET', KEYS[7], line),
      redis.call('HGET', KEYS[8], line) or '0'})
  else
    redis.call('XACK', KEYS[2], 'w', e[1])
  end
end
return out
";

/// Ends a lease held with a token, counting the attempt. KEYS: batch, stream, due, state,
/// holder, attempts, results, entries. ARGV: line, token, new state, due (ms), result, the
/// batch's counter to add one to (or ''). Returns 0 when the line was not leased with the token.
pub(super) const SETTLE: &str = r"
local line = ARGV[1]
if redis.call('HGET', KEYS[4], line) ~= 'leased' or redis.call('HGET', KEYS[5], line) ~= ARGV[2] then
  return 0
end
local entry = redis.call('HGET', KEYS[8], line)
if entry then redis.call('XACK', KEYS[2], 'w', entry) end
redis.call('HDEL', KEYS[5], line)
redis.call('HDEL', KEYS[8], line)
redis.call('HSET', KEYS[4], line, ARGV[3])
redis.call('HINCRBY', KEYS[6], line, 1)
if ARGV[3] == 'retry_at' then
  redis.call('ZADD', KEYS[3], ARGV[4], line)
else
  redis.call('HSET', KEYS[7], line, ARGV[5])
end
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[6], 1) end
return 1
";
