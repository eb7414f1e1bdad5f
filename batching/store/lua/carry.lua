-- Move some messages of a forming batch's claim into another claim of the same consumer, atomically: those
-- that did not fit the batch's cost budget (or its bucket) wait there for the next batch, still claimed.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  the claim the messages leave (list of source list, raw message, ...)
-- KEYS[3]  the claim they join (created if new)
-- ARGV[1]  id of the claim they leave (the owner's token)
-- ARGV[2]  id of the claim they join
-- ARGV[3]  lease in seconds: the joined claim's deadline is Redis's own TIME plus this
-- ARGV[4…] the raw messages to move
--
-- Guarantees: each message is in exactly one of the two claims before and after, with the list it came from, in
-- claim order (oldest first), so a recovery puts it back exactly where it was; nothing moves unless the leaving
-- claim is still this consumer's (its lease has not been taken over), and then the joining claim is registered
-- with a fresh lease. Returns the number of messages moved (0 if the claim was no longer this consumer's).

if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local move = {}
for i = 4, #ARGV do move[ARGV[i]] = true end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
local keep = {}
local moved = 0
for i = 1, #items, 2 do
  local src, raw = items[i], items[i + 1]
  if move[raw] then
    move[raw] = nil
    redis.call('RPUSH', KEYS[3], src, raw)
    moved = moved + 1
  else
    keep[#keep + 1] = src
    keep[#keep + 1] = raw
  end
end
if moved == 0 then
  return 0
end
redis.call('DEL', KEYS[2])
-- in chunks: unpack() of a long table would overflow Lua's stack
for i = 1, #keep, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(keep, i, math.min(i + 999, #keep)))
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3]), ARGV[2])
return moved
