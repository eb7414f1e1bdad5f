-- Admit a send to a bounded queue: push every message of it, or none, if the queue stays within its bound.
--
-- KEYS[1]  stats hash (``requests`` counts requests run by the consumers; ``drain:at``, ``drain:requests`` and
--          ``drain:rate`` are this script's measurement of how fast the queue drains)
-- KEYS[2…] the queue's lists, highest priority first (every list a waiting request can be in)
-- ARGV[1]  N, the most requests that may wait (max_queue_size)
-- ARGV[2]  now (unix seconds), for the drain-rate measurement
-- ARGV[3…] (list index, raw message) pairs: KEYS[1 + index] is the list the message goes to, as kombu routes it
--
-- Guarantees: the depth (the sum of LLEN over the lists: requests waiting, not yet claimed by a consumer) and the
-- pushes are one atomic step, so across any number of clients the queue never holds more than N because of a
-- send; a send that would exceed N stores nothing. Messages are LPUSHed exactly as kombu's Redis transport does.
-- The drain rate is measured only on refusals (a send that fits costs no write to the stats hash): the
-- ``requests`` counter is sampled at most once a second, and a sample older than 10 s restarts the measurement.
-- Returns: { 1, depth after the push } when admitted; { 0, depth, drain rate in requests/s or "" if unknown }
-- when refused.

local limit = tonumber(ARGV[1])
local depth = 0
for i = 2, #KEYS do
  depth = depth + redis.call('LLEN', KEYS[i])
end
local count = (#ARGV - 2) / 2
if depth + count <= limit then
  for i = 3, #ARGV, 2 do
    redis.call('LPUSH', KEYS[1 + tonumber(ARGV[i])], ARGV[i + 1])
  end
  return { 1, depth + count }
end

local now = tonumber(ARGV[2])
local sample = redis.call('HMGET', KEYS[1], 'requests', 'drain:at', 'drain:requests', 'drain:rate')
local requests = tonumber(sample[1] or '0')
local at = tonumber(sample[2] or '0')
local rate = sample[4] or ''
local age = now - at
if age >= 1 then
  if age <= 10 then
    rate = tostring((requests - tonumber(sample[3] or '0')) / age)
    redis.call('HSET', KEYS[1], 'drain:rate', rate)
  end
  redis.call('HSET', KEYS[1], 'drain:at', tostring(now), 'drain:requests', requests)
end
return { 0, depth, rate }
