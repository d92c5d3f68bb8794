-- Deletes an empty group (dead members are pruned first); publishes `D`.
-- KEYS: [1] group hash, [2] groups set, [3] joined times hash.
-- ARGV: [1] group id, [2] beat key prefix, [3] own member id.
-- Returns 1 deleted, -1/-2 not created, -3 not empty, -4 set removal failed.
local g, groups, times = KEYS[1], KEYS[2], KEYS[3]
local gid, prefix, self = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('SISMEMBER', groups, gid) == 0 then return -2 end
local fields = redis.call('HKEYS', g)
local live = 0
for _, m in ipairs(fields) do
  if m ~= GROUP_EXISTS then
    if m == self or redis.call('EXISTS', prefix .. m) == 1 then
      live = live + 1
    else
      prune_one(g, times, m)
    end
  end
end
if live > 0 then return -3 end
if redis.call('SREM', groups, gid) == 0 then return -4 end
redis.call('DEL', g, times)
redis.call('PUBLISH', g, 'D')
return 1
