-- Joins a member to a group; publishes `J<member>`.
-- KEYS: [1] group hash, [2] joined times hash.
-- ARGV: [1] member id, [2] capabilities (msgpack).
-- Returns 1 joined, -1 no group, -2 already a member.
local g, times = KEYS[1], KEYS[2]
local m, caps = ARGV[1], ARGV[2]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('HSETNX', g, m, caps) == 0 then return -2 end
local t = string.format('%.0f', now_us())
redis.call('HSET', times, m, t .. ' ' .. t)
redis.call('PUBLISH', g, 'J' .. m)
return 1
