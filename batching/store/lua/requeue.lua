-- Put claimed messages back at the front (oldest end) of the lists they came from, and drop the claims.
--
-- KEYS[1]  claims sorted set
-- KEYS[2]  deliveries hash (sha1 of raw message -> failed deliveries)
-- KEYS[3]  dead-letter list
-- KEYS[4…] claim lists, one per claim id in ARGV[5…]
-- ARGV[1]  mode: "release" (the owner gives back work it never started) or "expired" (recover dead consumers')
-- ARGV[2]  max deliveries: in "expired" mode a message handed out more often than this is dead-lettered
-- ARGV[3]  queue name, for dead-letter entries
-- ARGV[4]  why a message handed out too often never finished, for its dead-letter entry
-- ARGV[5…] claim ids
--
-- A lease has run out when its deadline is before Redis's own TIME: no host's clock is involved.
--
-- Guarantees: a claim is requeued once, by its owner ("release") or only after its lease deadline has passed
-- ("expired"); a live consumer's claim is never taken. Original order is kept: the oldest message is served next.
-- In "expired" mode a claim of several messages comes back to be handed out in halves; a claim of one message has
-- its delivery count raised by one, and past the maximum it goes to the dead-letter list
-- (JSON {queue, reason, at, raw, deliveries}, the shape ack.lua writes too) instead of back to its queue.
-- Returns: { messages requeued, dead-lettered raw1, raw2, ... } so the caller can mark those tasks FAILURE.

local expired = ARGV[1] == 'expired'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local max_deliveries = tonumber(ARGV[2])
local out = { 0 }
for c = 5, #ARGV do
  local id = ARGV[c]
  local key = KEYS[c - 1]
  local deadline = redis.call('ZSCORE', KEYS[1], id)
  if deadline and (not expired or tonumber(deadline) < now) then
    local items = redis.call('LRANGE', key, 0, -1)
    local size = #items / 2
    -- newest first, so that the claim's oldest message ends up at the right end, served next
    for i = #items - 1, 1, -2 do
      local src, raw = items[i], items[i + 1]
      local dead = false
      if expired and size > 1 then
        -- A batch died: it comes back in halves (claim.lua claims such messages in groups of this width), so a
        -- message that kills its consumers is cornered while the others go on in batches. Only a death alone
        -- counts towards max_deliveries: innocent neighbours are never dead-lettered for a killer's deaths.
        redis.call('HSET', KEYS[2], 'w:' .. redis.sha1hex(raw), math.ceil(size / 2))
      elseif expired then
        local sha = redis.sha1hex(raw)
        local n = redis.call('HINCRBY', KEYS[2], sha, 1)
        if n >= max_deliveries then
          dead = true
          redis.call('HDEL', KEYS[2], sha, 'w:' .. sha)
          redis.call('LPUSH', KEYS[3], cjson.encode({
            queue = ARGV[3], at = now, raw = raw, deliveries = n,
            reason = 'delivered ' .. n .. ' time(s) and never finished: ' .. ARGV[4],
          }))
          out[#out + 1] = raw
        end
      end
      if not dead then
        redis.call('RPUSH', src, raw)
        out[1] = out[1] + 1
      end
    end
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
