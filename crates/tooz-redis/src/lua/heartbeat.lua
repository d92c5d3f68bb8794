-- Refreshes the member's beat key and renews every hold of the coordinator.
-- KEYS: [1] beat key, then two keys per hold: lock + readers, or leader + owner.
-- ARGV: [1] membership ms, [2] lock ttl ms, then kind (`x`/`s`/`l`) and token per hold.
-- Returns one 0/1 per hold (1 = still held).
redis.call('SET', KEYS[1], 'Not dead!', 'PX', tonumber(ARGV[1]))
local ttl = tonumber(ARGV[2])
local now_ms = math.floor(now_us() / 1000)
local out = {}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local k, r = KEYS[2 * i], KEYS[2 * i + 1]
  local kind, token = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
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
return out
