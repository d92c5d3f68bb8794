-- Removes a member from a group; publishes `L<member>`.
-- KEYS: [1] group hash, [2] joined times hash.
-- ARGV: [1] member id.
-- Returns 1 left, -1 no group, -2 not a member.
local g, times = KEYS[1], KEYS[2]
local m = ARGV[1]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('HDEL', g, m) == 0 then return -2 end
redis.call('HDEL', times, m)
redis.call('PUBLISH', g, 'L' .. m)
return 1
