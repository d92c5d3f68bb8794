-- Gives up a group's leadership; publishes `E`.
-- KEYS: [1] leader key, [2] owner key.
-- ARGV: [1] token, [2] group channel.
-- Returns 1 when this token led, else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[2], 'E')
return 1
