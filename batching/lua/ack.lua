-- Finish a claimed batch: park not-yet-due messages, record dead letters and the batch size, drop the claim.
--
-- KEYS[1]  claims sorted set
-- KEYS[2]  this claim's list
-- KEYS[3]  delayed sorted set
-- KEYS[4]  dead-letter list
-- KEYS[5]  stats hash (field "size:<n>" counts batches of n requests)
-- ARGV[1]  claim id
-- ARGV[2]  size of the batch that ran (0: none ran)
-- ARGV[3]  D, the number of delayed messages that follow as ETA, raw pairs
-- ARGV[4 …] D × (ETA, raw), then dead-letter entries
--
-- Guarantees: everything happens or nothing does, so a message is never both re-queued and parked. Called only
-- after the batch's results are stored: a consumer that dies before this leaves the claim for recovery, which can
-- run a request twice but never loses one.
-- Returns 1 if this call removed the claim, 0 if it was already gone (recovered after its lease ran out).

local d = tonumber(ARGV[3])
local i = 4
for _ = 1, d do
  redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('LPUSH', KEYS[4], ARGV[i])
  i = i + 1
end
if tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[5], 'size:' .. ARGV[2], 1)
  redis.call('HINCRBY', KEYS[5], 'requests', ARGV[2])
end
redis.call('DEL', KEYS[2])
return redis.call('ZREM', KEYS[1], ARGV[1])
