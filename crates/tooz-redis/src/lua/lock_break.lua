-- Breaks a lock whoever holds it; publishes `broken` on the lock's channel.
-- KEYS: [1] lock key, [2] readers zset.
-- ARGV: none.
-- Returns 1 when anything was deleted, else 0.
local n = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', KEYS[1], 'broken')
if n > 0 then return 1 end
return 0
