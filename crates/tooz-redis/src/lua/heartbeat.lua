-- Refreshes the member's beat key, renews holds of the coordinator and checks
-- its memberships. The driver splits a large heartbeat into several calls of
-- this script (a bounded number of keys each), pipelined in one round trip, so
-- no single call blocks the server long.
-- KEYS: [1] beat key, then two keys per hold (lock + readers, or leader + owner),
--       then one group hash per joined group to check.
-- ARGV: [1] membership ms (`0`: leave the beat key alone, another call of this
--       heartbeat sets it), [2] lock ttl ms, [3] member id, then kind (`x`/`s`/`l`)
--       and token per hold.
-- Returns one 0/1 per hold (1 = still held), then one 0/1 per group (1 = the
-- member is in the group hash; 0 = the server lost it: a failover with
-- asynchronous replication, a restart without persistence, a deleted field).
local beat_ms = tonumber(ARGV[1])
if beat_ms > 0 then
  redis.call('SET', KEYS[1], 'Not dead!', 'PX', beat_ms)
end
local ttl = tonumber(ARGV[2])
local me = ARGV[3]
local now_ms = math.floor(now_us() / 1000)
local out = {}
local n = (#ARGV - 3) / 2
for i = 1, n do
  local k, r = KEYS[2 * i], KEYS[2 * i + 1]
  local kind, token = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if kind == 'l' then
    if redis.call('GET', k) == token then
      redis.call('PEXPIRE', k, ttl)
      redis.call('PEXPIRE', r, ttl)
      out[i] = 1
    else
      out[i] = 0
    end
  else
    out[i] = renew_lock(k, r, kind, token, ttl, now_ms, true)
  end
end
for j = 2 + 2 * n, #KEYS do
  -- A group key of another type (junk) cannot tell: counted as present, so the
  -- coordinator does not loop on a re-join that would fail the same way.
  local v = redis.pcall('HEXISTS', KEYS[j], me)
  if type(v) == 'table' then v = 1 end
  out[#out + 1] = v
end
return out
