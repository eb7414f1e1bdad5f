-- Coalesce claimed requests with identical ones already in flight (coalesce=True), atomically.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  this claim's list (source list, raw message, ...)
-- KEYS[3…] one coalescing key per request (its value: the claim id of the batch computing that input)
-- ARGV[1]  this claim's id
-- ARGV[2]  how long a coalescing key lives after its last use, in milliseconds (two leases)
-- ARGV[3]  the claim lists' key prefix (QueueKeys.claim("")): the list of the claim named by a coalescing key
-- ARGV[4…] the raw messages, one per key of KEYS[3…]
--
-- For each request: if its key names another claim whose lease is still running (by Redis's TIME), the message
-- moves from this claim's list to that claim's list — it becomes a follower, answered with that batch's result
-- and recovered with that claim if its consumer dies. Otherwise (no key, a claim already finished, or one whose
-- lease ran out: its consumer is dead and recovery will re-queue what it held) this claim becomes the key's
-- owner and computes it. A key's expiry is only its clean-up: what counts is the owner's lease.
-- Guarantees: a message is in exactly one claim at every moment (never neither, never both); a claim left with
-- no message is dropped, so no empty claim waits for recovery.
-- Returns one integer per request: 1 = this claim computes it, 0 = it moved to the claim that already does.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ours = ARGV[1]
local ttl = tonumber(ARGV[2])
local tomb = '\0coalesced'
local out = {}
local moved = 0
for i = 3, #KEYS do
  local raw = ARGV[i + 1]
  local owner = redis.call('GET', KEYS[i])
  local deadline = owner and owner ~= ours and redis.call('ZSCORE', KEYS[1], owner)
  local pos = deadline and tonumber(deadline) > now and redis.call('LPOS', KEYS[2], raw)
  if pos then
    local src = redis.call('LINDEX', KEYS[2], pos - 1)
    redis.call('LSET', KEYS[2], pos - 1, tomb)
    redis.call('LSET', KEYS[2], pos, tomb)
    redis.call('RPUSH', ARGV[3] .. owner, src, raw)
    redis.call('PEXPIRE', KEYS[i], ttl)
    moved = moved + 1
    out[#out + 1] = 0
  else
    redis.call('SET', KEYS[i], ours, 'PX', ttl)
    out[#out + 1] = 1
  end
end
if moved > 0 then
  redis.call('LREM', KEYS[2], 0, tomb)
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('ZREM', KEYS[1], ours)
  end
end
return out
