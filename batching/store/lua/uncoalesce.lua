-- A coalescing batch has run: stop taking followers for its inputs and hand back every follower it holds.
--
-- KEYS[1]  claims sorted set (claim id -> lease deadline)
-- KEYS[2]  this claim's list (source list, raw message, ...)
-- KEYS[3…] the coalescing keys this claim owns
-- ARGV[1]  this claim's id
--
-- Called by the owner after its batch ran and before its results are stored; the claim is finished (ack.lua)
-- only after the followers' results are stored too. Keys that another claim has taken over meanwhile (this one's
-- expired) are left alone. Once this returns, no follower joins this claim: an identical request arriving later
-- becomes the owner of a new computation.
-- Guarantees: nothing is written if the claim is no longer this consumer's (its lease ran out and it was
-- re-queued, followers included): its messages are back in the queue.
-- Returns every raw message the claim holds (its own and its followers'), or an empty list if it is not ours.

if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {}
end
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
local raws = {}
for i = 2, #items, 2 do
  raws[#raws + 1] = items[i]
end
return raws
