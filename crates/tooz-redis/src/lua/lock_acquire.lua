-- Acquires a lock, exclusive (mode `x`) or shared (mode `s`), with a fencing token.
-- KEYS: [1] lock key, [2] readers zset, [3] fence counter.
-- ARGV: [1] token, [2] ttl ms, [3] mode (`x`/`s`), [4] fence counter ttl ms.
-- Returns {1, fence} when acquired (or already held by this token: a replayed
-- request), {0, wait_ms, rust_holder} when someone else holds it.
local k, r, f = KEYS[1], KEYS[2], KEYS[3]
local token, ttl, mode, fttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = now_us()
local now_ms = math.floor(now / 1000)
local cur = redis.call('GET', k)
if mode == 'x' then
  if cur == token then return {1, cur_fence(f)} end
  if cur then return {0, redis.call('PTTL', k), is_rs(cur)} end
  redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
  local top = redis.call('ZRANGE', r, -1, -1, 'WITHSCORES')
  if #top > 0 then return {0, math.floor(tonumber(top[2]) - now_ms), 1} end
  redis.call('SET', k, token, 'PX', ttl)
  return {1, next_fence(f, now, fttl)}
end
if redis.call('ZSCORE', r, token) then return {1, cur_fence(f)} end
if cur and cur ~= MARKER then return {0, redis.call('PTTL', k), is_rs(cur)} end
redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
redis.call('ZADD', r, now_ms + ttl, token)
refresh_marker(k, r, now_ms)
return {1, next_fence(f, now, fttl)}
