-- Releases one hold; when the lock became free, wakes the next queued waiter(s)
-- (nothing is published when nobody is queued).
-- KEYS: [1] lock key, [2] readers zset, [3] waiter queue zset, [4] waiter
--       registrations hash.
-- ARGV: [1] token, [2] mode (`x`/`s`).
-- Returns 1 when this token held the lock, else 0.
local k, r, q, w = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, mode = ARGV[1], ARGV[2]
if mode == 'x' then
  if redis.call('GET', k) ~= token then return 0 end
  redis.call('DEL', k)
  wake_next(k, q, w, false)
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
  if refresh_marker(k, r, now_ms) == 0 then wake_next(k, q, w, false) end
  return 1
end
return 0
