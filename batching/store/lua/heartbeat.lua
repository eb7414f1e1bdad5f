-- A consumer's heartbeat: extend the leases of its live claims and record that it is alive, by Redis's clock.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  consumers sorted set (consumer id -> last heartbeat)
-- ARGV[1]  lease in seconds
-- ARGV[2]  consumer id
-- ARGV[3…] this consumer's claim ids
--
-- Guarantees: a claim that was already recovered (no longer in KEYS[1]) is never re-created (ZADD XX), and every
-- deadline is Redis's TIME plus the lease, whatever the consumer's own clock says.
-- Returns Redis's TIME as { seconds, microseconds }, from which the consumer keeps its clock offset.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local deadline = now + tonumber(ARGV[1])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
return t
