-- Claim up to N of the oldest messages of a batched task's queue for one consumer's batch, atomically.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  this claim's list (source list, raw message, source list, raw message, ...)
-- KEYS[3]  delayed sorted set (raw message -> ETA)
-- KEYS[4]  deliveries hash (sha1 of raw message -> times it was handed out before and not finished)
-- KEYS[5]  abandoned sorted set (task id -> when its caller gave up); only its existence is read here
-- KEYS[6…] the queue's lists, highest priority first; KEYS[6] is the default-priority list
-- ARGV[1]  N, the most messages to take
-- ARGV[2]  claim id
-- ARGV[3]  lease in seconds: the claim's deadline is Redis's own TIME plus this
-- ARGV[4]  how many messages this claim already holds (a top-up of a forming batch), 0 for a new claim
--
-- Time is Redis's TIME, never a host's clock: a consumer whose clock is off neither steals live claims nor
-- registers a deadline already past, and ETAs come due by the same clock for every consumer.
-- Guarantees: a message is either still in its queue or recorded in this claim (with the list it came from, so a
-- recovery can put it back exactly), never neither. Delayed messages whose ETA has passed are first moved to the
-- oldest end of the default list, earliest ETA first, so they are served before anything newer. Messages whose
-- batch died with its consumer come back in halves (requeue.lua records the width): a group of them is claimed on
-- its own, never with ordinary messages, so a message that kills consumers is cornered in log2(n) deliveries while
-- its innocent neighbours go on in batches; one that died alone is claimed alone until it is dead-lettered. A
-- top-up of a claim that already holds messages therefore stops before such a message and leaves it first in line.
-- Returns: { next ETA still pending or "", redelivered count of the first message, 1 if any request of the queue
-- was abandoned by its caller lately (the consumer then looks the claimed ids up) else 0, raw1, raw2, ... },
-- oldest first.

local n = tonumber(ARGV[1])
local held = tonumber(ARGV[4] or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, n)
-- latest ETA first, so that the one due longest ends up at the right end, served next
for k = #due, 1, -1 do
  redis.call('RPUSH', KEYS[6], due[k])
  redis.call('ZREM', KEYS[3], due[k])
end

local tracked = redis.call('EXISTS', KEYS[4]) == 1
-- How a message that was handed out before and never finished may be claimed: alone (it died alone before:
-- limit 1, seen > 0), or with at most `limit` other such messages (its whole batch died: the halves of that
-- batch come back as groups). 0: an ordinary message.
local function suspicion(raw)
  if not tracked then return 0, 0 end
  local sha = redis.sha1hex(raw)
  local seen = tonumber(redis.call('HGET', KEYS[4], sha) or '0')
  if seen > 0 then return 1, seen end
  return tonumber(redis.call('HGET', KEYS[4], 'w:' .. sha) or '0'), 0
end

local out = { '', 0, redis.call('EXISTS', KEYS[5]) }
local taken = 0
local group = 0
-- (source list, raw) pairs for this claim's list, pushed at the end in a few calls rather than one per message:
-- a call from Lua costs Redis more than the element it pushes.
local record = {}
local stop = false
for i = 6, #KEYS do
  if taken >= n or stop then break end
  local got = redis.call('RPOP', KEYS[i], n - taken)
  if got then
    for j, raw in ipairs(got) do
      local limit, seen = suspicion(raw)
      if (limit > 0 and group == 0 and taken + held > 0) or (limit == 0 and group > 0) then
        -- a suspect never joins ordinary messages, nor they a suspect group: put it and everything after it
        -- back, oldest ending up at the right end again
        for k = #got, j, -1 do redis.call('RPUSH', KEYS[i], got[k]) end
        stop = true
        break
      end
      if limit > 0 and group == 0 then
        group = limit
        out[2] = math.max(seen, 1)
      end
      record[#record + 1] = KEYS[i]
      record[#record + 1] = raw
      out[#out + 1] = raw
      taken = taken + 1
      if group > 0 and taken >= group then
        for k = #got, j + 1, -1 do redis.call('RPUSH', KEYS[i], got[k]) end
        stop = true
        break
      end
    end
  end
end
for first = 1, #record, 1000 do  -- unpack() is bounded by Lua's C stack (8,000 values)
  redis.call('RPUSH', KEYS[2], unpack(record, first, math.min(first + 999, #record)))
end
if taken > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
end

local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if nxt[2] then out[1] = nxt[2] end
return out
