-- Creates a group.
-- KEYS: [1] group hash, [2] groups set.
-- ARGV: [1] group id.
-- Returns 1 created, 0 already exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], GROUP_EXISTS, '1')
return 1
