-- Mark a batch's tasks STARTED (track_started), in one round trip, never over a task's final state.
--
-- KEYS[i]  celery-task-meta-<id> of task i
-- ARGV[1]  "json" when the backend stores JSON metas (their status can be read here), anything else otherwise
-- ARGV[2]  time to live in seconds of the STARTED metas (0: no expiry)
-- ARGV[2 + i]  the encoded STARTED meta of task i (built by the backend's own helpers)
--
-- Guarantee: a task whose meta already holds SUCCESS, FAILURE or REVOKED (a redelivered message whose results
-- were stored, a task revoked while its batch formed) keeps it. A task with no meta (PENDING) or a RETRY/STARTED
-- one gets STARTED, with the SET and PUBLISH of the backend's own set(). Metas this script cannot read (a pickle
-- or msgpack result serializer) are never overwritten: STARTED is then shown only for tasks without a meta yet.
-- Returns how many tasks were marked.

local final = {SUCCESS = true, FAILURE = true, REVOKED = true}
local readable = ARGV[1] == 'json'
local ttl = tonumber(ARGV[2])
local marked = 0
for i = 1, #KEYS do
  local old = redis.call('GET', KEYS[i])
  local write = not old
  if old and readable then
    local ok, meta = pcall(cjson.decode, old)
    write = ok and type(meta) == 'table' and not final[meta['status']]
  end
  if write then
    if ttl > 0 then
      redis.call('SET', KEYS[i], ARGV[2 + i], 'EX', ttl)
    else
      redis.call('SET', KEYS[i], ARGV[2 + i])
    end
    redis.call('PUBLISH', KEYS[i], ARGV[2 + i])
    marked = marked + 1
  end
end
return marked
