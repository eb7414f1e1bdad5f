-- A consumer's heartbeat: extend the leases of its live claims and record that it is alive, by Redis's clock.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  consumers sorted set (consumer id -> last heartbeat)
-- KEYS[3]  the queue's epoch marker
-- KEYS[4]  tuning hash (consumer id -> JSON of the batching values it uses)
-- ARGV[1]  lease in seconds
-- ARGV[2]  consumer id
-- ARGV[3]  a fresh epoch id, set if the marker is gone
-- ARGV[4]  JSON of the batching values this consumer uses now
-- ARGV[5…] this consumer's claim ids
--
-- Guarantees: a claim that was already recovered (no longer in KEYS[1]) is never re-created (ZADD XX), and every
-- deadline is Redis's TIME plus the lease, whatever the consumer's own clock says.
-- The epoch marker is set when the queue is first used and never deleted: if it is gone, Redis lost its data
-- (a restart without persistence, a flush, an eviction) and everything it held for this queue with it.
-- Returns { seconds, microseconds } of Redis's TIME (the consumer keeps its clock offset from it), the current
-- epoch, and 1 if this call found the marker gone (and set a new one), else 0.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local deadline = now + tonumber(ARGV[1])
for i = 5, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
-- Consumers gone for ten leases (killed, never said goodbye) leave the list, so it does not grow without end.
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - 10 * tonumber(ARGV[1]))
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 10 * tonumber(ARGV[1]))
  redis.call('HDEL', KEYS[4], unpack(gone))
end
local lost = 0
if redis.call('SET', KEYS[3], ARGV[3], 'NX') then
  lost = 1
end
return { t[1], t[2], redis.call('GET', KEYS[3]), lost }
