-- Store a batch's task results in the layout of Celery's Redis result backend, in one round trip, fenced.
--
-- ARGV[1]  n, the number of results
-- KEYS[1…n]  celery-task-meta-<id> of task i
-- KEYS[n+1]  (optional) the claims sorted set of the batch's queue: the fence
-- ARGV[1+i]  task i's encoded meta (built by the backend's own helpers)
-- ARGV[1+n+i]  its time to live in seconds (0: no expiry)
-- ARGV[2n+2]  (with the fence) the batch's claim id
--
-- Per task exactly what the backend's own set() does: SET (with EX) for later get()/.state calls, and PUBLISH on
-- the same key for clients already blocked in get(). One script call instead of a two-command pipeline per task
-- halves what the consumer spends packing commands and parsing replies.
-- Guarantees: with the fence, nothing is written unless the claim is still registered, i.e. still this
-- consumer's: a consumer whose lease ran out (a partition, a pause) and whose batch was re-queued and run
-- elsewhere never stores its late outcomes over the other run's. Returns n, or -1 when fenced off.

local n = tonumber(ARGV[1])
if KEYS[n + 1] and not redis.call('ZSCORE', KEYS[n + 1], ARGV[2 * n + 2]) then
  return -1
end
for i = 1, n do
  local ttl = tonumber(ARGV[1 + n + i])
  if ttl > 0 then
    redis.call('SET', KEYS[i], ARGV[1 + i], 'EX', ttl)
  else
    redis.call('SET', KEYS[i], ARGV[1 + i])
  end
  redis.call('PUBLISH', KEYS[i], ARGV[1 + i])
end
return n
