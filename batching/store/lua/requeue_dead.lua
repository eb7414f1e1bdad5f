-- Move one dead letter back into its queue as a new message, atomically.
--
-- KEYS[1]  dead-letter list
-- KEYS[2]  deliveries hash (sha1 of raw message -> failed deliveries)
-- KEYS[3]  the queue's default-priority list
-- ARGV[1]  the dead-letter entry exactly as stored
-- ARGV[2]  the raw message it holds
--
-- Guarantees: the entry leaves the dead-letter list and the message enters the queue in one step, so a caller that
-- dies in between neither loses the message nor leaves it in both places; an entry already moved (by another
-- operator) is not pushed again. The message starts with no recorded deliveries, at the newest end of the queue.
-- Returns 1 if the entry was moved, 0 if it was no longer there.

if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
local sha = redis.sha1hex(ARGV[2])
redis.call('HDEL', KEYS[2], sha, 'w:' .. sha)
redis.call('LPUSH', KEYS[3], ARGV[2])
return 1
