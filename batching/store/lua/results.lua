-- Store a batch's task results in the layout of Celery's Redis result backend, in one round trip.
--
-- KEYS[i]  celery-task-meta-<id> of task i
-- ARGV[i]  its encoded meta (built by the backend's own helpers)
-- ARGV[#KEYS + i]  its time to live in seconds (0: no expiry)
--
-- Per task exactly what the backend's own set() does: SET (with EX) for later get()/.state calls, and PUBLISH on
-- the same key for clients already blocked in get(). One script call instead of a two-command pipeline per task
-- halves what the consumer spends packing commands and parsing replies.

local n = #KEYS
for i = 1, n do
  local ttl = tonumber(ARGV[n + i])
  if ttl > 0 then
    redis.call('SET', KEYS[i], ARGV[i], 'EX', ttl)
  else
    redis.call('SET', KEYS[i], ARGV[i])
  end
  redis.call('PUBLISH', KEYS[i], ARGV[i])
end
return n
