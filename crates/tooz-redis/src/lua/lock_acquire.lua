-- Acquires a lock, exclusive (mode `x`) or shared (mode `s`), with a fencing token;
-- registers a blocked waiter in the lock's queue when it does not get it.
-- KEYS: [1] lock key, [2] readers zset, [3] fence counter, [4] waiter queue zset,
--       [5] waiter registrations hash.
-- ARGV: [1] token, [2] ttl ms, [3] mode (`x`/`s`), [4] fence counter ttl ms,
--       [5] waiter id (empty: not waiting, nothing is registered),
--       [6] shortest registration lifetime ms.
-- Returns {1, fence} when acquired (or already held by this token: a replayed
-- request), {0, wait_ms, rust_holder} when someone else holds it.
local k, r, f, q, w = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local token, ttl, mode, fttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local waiter = ARGV[5] or ''
local now = now_us()
local now_ms = math.floor(now / 1000)
-- Not granted: (re)registers the waiter, keeping its place in the queue.
local function held(wait_ms, rs)
  if waiter ~= '' then
    local life = tonumber(ARGV[6])
    if wait_ms > 0 and 2 * wait_ms + 1000 > life then life = 2 * wait_ms + 1000 end
    -- pcall: with another client's junk in these keys the waiter is simply not
    -- queued (it still wakes on `released` and at the hold's expiry).
    local added = redis.pcall('ZADD', q, 'NX', now, waiter)
    local set = redis.pcall('HSET', w, waiter, mode .. string.format('%.0f', now_ms + life))
    -- (A failed call returns a table carrying `err`; these succeed with integers.)
    if type(added) ~= 'table' and type(set) ~= 'table' and redis.call('PTTL', q) < life then
      redis.call('PEXPIRE', q, life)
      redis.call('PEXPIRE', w, life)
    end
  end
  return {0, wait_ms, rs}
end
-- Granted: the waiter leaves the queue.
local function granted(fence)
  if waiter ~= '' then
    redis.pcall('ZREM', q, waiter)
    redis.pcall('HDEL', w, waiter)
  end
  return {1, fence}
end
local cur = redis.call('GET', k)
if mode == 'x' then
  if cur == token then return granted(cur_fence(f)) end
  if cur then return held(redis.call('PTTL', k), is_rs(cur)) end
  -- Readers left behind (the marker broken by Python): the latest expiry decides.
  local top = redis.call('ZRANGE', r, -1, -1, 'WITHSCORES')
  if #top > 0 then
    local left = math.floor(tonumber(top[2]) - now_ms)
    if left > 0 then return held(left, 1) end
    redis.call('DEL', r)
  end
  redis.call('SET', k, token, 'PX', ttl)
  return granted(next_fence(f, now, fttl))
end
if redis.call('ZSCORE', r, token) then return granted(cur_fence(f)) end
if cur and cur ~= MARKER then return held(redis.call('PTTL', k), is_rs(cur)) end
redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
redis.call('ZADD', r, now_ms + ttl, token)
refresh_marker(k, r, now_ms)
return granted(next_fence(f, now, fttl))
