-- Replaces a member's capabilities; publishes `U<member>`.
-- KEYS: [1] group hash, [2] joined times hash.
-- ARGV: [1] member id, [2] capabilities (msgpack).
-- Returns 1 updated, -1 no group, -2 not a member.
local g, times = KEYS[1], KEYS[2]
local m, caps = ARGV[1], ARGV[2]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('HEXISTS', g, m) == 0 then return -2 end
redis.call('HSET', g, m, caps)
local t = string.format('%.0f', now_us())
local old = redis.call('HGET', times, m)
local created = t
if old then
  local sp = string.find(old, ' ', 1, true)
  if sp then created = string.sub(old, 1, sp - 1) end
end
redis.call('HSET', times, m, created .. ' ' .. t)
redis.call('PUBLISH', g, 'U' .. m)
return 1
