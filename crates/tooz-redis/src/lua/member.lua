-- Reads one member of a group (pruning it when its beat key is gone).
-- KEYS: [1] group hash, [2] joined times hash.
-- ARGV: [1] beat key prefix, [2] own member id, [3] member id.
-- Returns {-1} no group, {-2} not joined (or dead), {1, caps, times or nil}.
local g, times = KEYS[1], KEYS[2]
local prefix, self, m = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', g) == 0 then return {-1} end
local caps = redis.call('HGET', g, m)
if not caps then return {-2} end
if m ~= self and redis.call('EXISTS', prefix .. m) == 0 then
  prune_one(g, times, m)
  return {-2}
end
return {1, caps, redis.call('HGET', times, m)}
