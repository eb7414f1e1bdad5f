-- Claim up to N of the oldest messages of a batched task's queue for one consumer's batch, atomically.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  this claim's list (source list, raw message, source list, raw message, ...)
-- KEYS[3]  delayed sorted set (raw message -> ETA)
-- KEYS[4…] the queue's lists, highest priority first; KEYS[4] is the default-priority list
-- ARGV[1]  N, the most messages to take
-- ARGV[2]  claim id
-- ARGV[3]  lease deadline (unix seconds)
-- ARGV[4]  now (unix seconds)
--
-- Guarantees: a message is either still in its queue or recorded in this claim (with the list it came from, so a
-- recovery can put it back exactly), never neither. Delayed messages whose ETA has passed are first moved to the
-- oldest end of the default list, so they are served before anything newer.
-- Returns: { next ETA still pending or "", raw1, raw2, ... } with the oldest message first.

local n = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4], 'LIMIT', 0, n)
for _, raw in ipairs(due) do
  redis.call('RPUSH', KEYS[4], raw)
  redis.call('ZREM', KEYS[3], raw)
end

local out = { '' }
local taken = 0
for i = 4, #KEYS do
  if taken >= n then break end
  local got = redis.call('RPOP', KEYS[i], n - taken)
  if got then
    for _, raw in ipairs(got) do
      redis.call('RPUSH', KEYS[2], KEYS[i], raw)
      out[#out + 1] = raw
    end
    taken = taken + #got
  end
end
if taken > 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
end

local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if nxt[2] then out[1] = nxt[2] end
return out
