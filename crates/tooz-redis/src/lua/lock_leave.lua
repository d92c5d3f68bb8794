-- A blocked waiter gives up: leaves the lock's queue and, when the lock is free
-- (or held shared, for sharing waiters), wakes the next waiter(s) in its place (it
-- may have been woken without taking the lock).
-- KEYS: [1] lock key, [2] waiter queue zset, [3] waiter registrations hash.
-- ARGV: [1] waiter id.
-- Returns the number of waiters woken.
local k, q, w = KEYS[1], KEYS[2], KEYS[3]
redis.pcall('ZREM', q, ARGV[1])
redis.pcall('HDEL', w, ARGV[1])
local cur = redis.call('GET', k)
if not cur then return wake_next(k, q, w, false) end
if cur == MARKER then return wake_next(k, q, w, true) end
return 0
