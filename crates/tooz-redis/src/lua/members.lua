-- Lists the live members of a group; dead ones (beat key gone) are removed and
-- their departure published.
-- KEYS: [1] group hash, [2] joined times hash.
-- ARGV: [1] beat key prefix, [2] own member id, [3] with capabilities (`0`/`1`).
-- Returns {-1} no group, else {1, member, [caps,] ...}.
local g, times = KEYS[1], KEYS[2]
local prefix, self, with_caps = ARGV[1], ARGV[2], ARGV[3] == '1'
if redis.call('EXISTS', g) == 0 then return {-1} end
local all = redis.call('HGETALL', g)
local out = {1}
for i = 1, #all, 2 do
  local m = all[i]
  if m ~= GROUP_EXISTS then
    if m == self or redis.call('EXISTS', prefix .. m) == 1 then
      out[#out + 1] = m
      if with_caps then out[#out + 1] = all[i + 1] end
    else
      prune_one(g, times, m)
    end
  end
end
return out
