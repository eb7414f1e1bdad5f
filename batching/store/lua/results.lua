-- Store a batch's task results in the layout of Celery's Redis result backend, in one round trip, fenced.
--
-- ARGV[1]  n, the number of results
-- KEYS[1…n]  celery-task-meta-<id> of task i
-- KEYS[n+1]  (optional) the claims sorted set of the batch's queue: the fence
-- ARGV[1+i]  task i's encoded meta (built by the backend's own helpers)
-- ARGV[n+2]  k: tasks 1…k live ARGV[n+3] seconds, the others (failures under result_expires for failures)
--            ARGV[n+4] seconds (0: no expiry)
-- ARGV[n+5]  (with the fence) the batch's claim id
--
-- Per task exactly what the backend's own set() does: SET (with EX) for later get()/.state calls, and PUBLISH on
-- the same key for clients already blocked in get(). One script call instead of a two-command pipeline per task
-- halves what the consumer spends packing commands and parsing replies; two lifetimes for the batch rather than
-- one per task spare Redis an argument per task.
-- Guarantees: with the fence, nothing is written unless the claim is still registered, i.e. still this
-- consumer's: a consumer whose lease ran out (a partition, a pause) and whose batch was re-queued and run
-- elsewhere never stores its late outcomes over the other run's. Returns n, or -1 when fenced off.

local n = tonumber(ARGV[1])
if KEYS[n + 1] and not redis.call('ZSCORE', KEYS[n + 1], ARGV[n + 5]) then
  return -1
end
local k = tonumber(ARGV[n + 2])
local ttls = { tonumber(ARGV[n + 3]), tonumber(ARGV[n + 4]) }
for i = 1, n do
  local ttl = ttls[i <= k and 1 or 2]
  if ttl > 0 then
    redis.call('SET', KEYS[i], ARGV[1 + i], 'EX', ttl)
  else
    redis.call('SET', KEYS[i], ARGV[1 + i])
  end
  redis.call('PUBLISH', KEYS[i], ARGV[1 + i])
end
return n
