-- Releases one hold; publishes `released` on the lock's channel when the lock
-- became free.
-- KEYS: [1] lock key, [2] readers zset.
-- ARGV: [1] token, [2] mode (`x`/`s`).
-- Returns 1 when this token held the lock, else 0.
local k, r = KEYS[1], KEYS[2]
local token, mode = ARGV[1], ARGV[2]
if mode == 'x' then
  if redis.call('GET', k) ~= token then return 0 end
  redis.call('DEL', k)
  redis.call('PUBLISH', k, 'released')
  return 1
end
local now_ms = math.floor(now_us() / 1000)
local s = redis.call('ZSCORE', r, token)
if not s then return 0 end
redis.call('ZREM', r, token)
if tonumber(s) < now_ms then return 0 end
redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
local cur = redis.call('GET', k)
if (not cur) or cur == MARKER then
  if refresh_marker(k, r, now_ms) == 0 then redis.call('PUBLISH', k, 'released') end
  return 1
end
return 0
