-- Finish a claimed batch: park not-yet-due messages, record dead letters and the batch size, drop the claim.
--
-- KEYS[1]  claims sorted set
-- KEYS[2]  this claim's list
-- KEYS[3]  delayed sorted set
-- KEYS[4]  dead-letter list
-- KEYS[5]  stats hash (field "size:<n>" counts batches of n requests)
-- KEYS[6]  deliveries hash
-- KEYS[7]  flush-reason counts of the current minute (hash: reason -> batches), kept for a few minutes
-- ARGV[1]  claim id (the owner's token)
-- ARGV[2]  size of the batch that ran (0: none ran)
-- ARGV[3]  D, the number of delayed messages that follow as ETA, raw pairs
-- ARGV[4]  queue name, for dead-letter entries
-- ARGV[5]  why the batch was flushed ("count", "max_delay", ...), counted with its size
-- ARGV[6]  seconds the flush-reason counts are kept
-- ARGV[7 …] D × (ETA, raw), then (reason, raw) pairs to dead-letter (stamped with Redis's TIME)
--
-- Guarantees: only the claim's owner finishes it, and everything happens or nothing does. If the claim is gone
-- (its lease ran out and another consumer re-queued it), nothing is written: the messages are back in the queue
-- and will be finished by whoever holds them now. Called only after the batch's results are stored, so a consumer
-- that dies before this leaves the claim for recovery, which may run a request twice but never loses one.
-- Returns 1 if this call finished the claim, 0 if it was no longer this consumer's.

if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  local items = redis.call('LRANGE', KEYS[2], 0, -1)
  for i = 2, #items, 2 do
    local sha = redis.sha1hex(items[i])
    redis.call('HDEL', KEYS[6], sha, 'w:' .. sha)
  end
end
local d = tonumber(ARGV[3])
local i = 7
for _ = 1, d do
  redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- Dead letters are JSON {queue, reason, at, raw}: the same shape requeue.lua writes, read by DeadLetter.parse.
if i < #ARGV then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  while i < #ARGV do
    redis.call('LPUSH', KEYS[4], cjson.encode({ queue = ARGV[4], reason = ARGV[i], at = now, raw = ARGV[i + 1] }))
    i = i + 2
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[5], 'size:' .. ARGV[2], 1)
  redis.call('HINCRBY', KEYS[5], 'requests', ARGV[2])
  -- Per batch, never per item: one field of a key per minute that expires by itself, so the recent window needs
  -- no trimming.
  redis.call('HINCRBY', KEYS[7], ARGV[5], 1)
  redis.call('EXPIRE', KEYS[7], ARGV[6])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
