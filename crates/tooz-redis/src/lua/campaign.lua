-- Takes or keeps a group's leadership, with a fencing token; publishes `E` on a
-- fresh grant.
-- KEYS: [1] leader key, [2] owner key, [3] fence counter.
-- ARGV: [1] token, [2] member id, [3] ttl ms, [4] group channel, [5] fence ttl ms.
-- Returns {1, fence, new} leading (new = 1 for a fresh grant, 0 when still
-- leading), {0} someone else leads.
local l, o, f = KEYS[1], KEYS[2], KEYS[3]
local token, member, ttl, chan, fttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cur = redis.call('GET', l)
if cur == token then
  redis.call('PEXPIRE', l, ttl)
  redis.call('SET', o, token .. ' ' .. member, 'PX', ttl)
  return {1, cur_fence(f), 0}
end
if cur then return {0} end
redis.call('SET', l, token, 'PX', ttl)
redis.call('SET', o, token .. ' ' .. member, 'PX', ttl)
local fence = next_fence(f, now_us(), fttl)
redis.call('PUBLISH', chan, 'E')
return {1, fence, 1}
