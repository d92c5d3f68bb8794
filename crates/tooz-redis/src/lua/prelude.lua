-- Prelude: helpers prepended to every other script in this directory (the
-- driver sends prelude + script as one EVAL body; this file is never run alone).
--   now_us()          server TIME in microseconds
--   is_rs(v)          1 when a lock value is a tooz-rs token (`tooz-rs:` prefix)
--   next_fence(...)   advances a fencing counter to max(stored + 1, now)
--   cur_fence(fkey)   the stored fencing counter (0 when absent or junk)
--   refresh_marker    points the shared marker at the latest reader expiry
--   renew_lock(...)   renews or checks one exclusive or shared hold
--   prune_one(...)    removes a dead member from a group and publishes `L<member>`
--   wake_next(...)    wakes the oldest live waiter(s) of a lock's queue
local GROUP_EXISTS = '__created__'
local MARKER = 'tooz-rs:shared'
local PREFIX = 'tooz-rs:'
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function is_rs(v)
  if v and string.sub(v, 1, #PREFIX) == PREFIX then return 1 end
  return 0
end
-- The stored counter, or 0 when it is not an integer in [0, 2^53) (another
-- client's junk: text, negative, fractional, nan, inf, too large to count up
-- exactly in a Lua double, or a key of another type); the next grant then starts
-- again from server time, as after a restart without persistence, and overwrites
-- it. Never an error: scripts call it after their first write, and Redis does not
-- roll a script back.
local FENCE_MAX = 9007199254740991
local function read_fence(fkey)
  local v = redis.pcall('GET', fkey)
  if type(v) == 'table' then v = 'a ' .. redis.call('TYPE', fkey)['ok'] end
  local n = tonumber(v or '0')
  if n == nil or n ~= n or n < 0 or n > FENCE_MAX or n ~= math.floor(n) then
    redis.log(redis.LOG_WARNING, 'tooz: ignoring fencing counter ' .. fkey .. ' = ' .. tostring(v))
    return 0
  end
  return n
end
local function next_fence(fkey, now, ttl)
  local prev = read_fence(fkey)
  local f = prev + 1
  if now > f then f = now end
  redis.call('SET', fkey, string.format('%.0f', f), 'PX', ttl)
  return f
end
local function cur_fence(fkey)
  return read_fence(fkey)
end
-- Points the marker (and the readers set) at the latest reader expiry; removes
-- both when no reader is left. Only called when the plain key is absent or the marker.
local function refresh_marker(k, r, now_ms)
  local top = redis.call('ZRANGE', r, -1, -1, 'WITHSCORES')
  if #top == 0 then
    if redis.call('GET', k) == MARKER then redis.call('DEL', k) end
    redis.call('DEL', r)
    return 0
  end
  local left = math.floor(tonumber(top[2]) - now_ms)
  if left < 1 then left = 1 end
  redis.call('SET', k, MARKER, 'PX', left)
  redis.call('PEXPIRE', r, left)
  return 1
end
-- Renews (renew = true) or checks one hold. 1 when still held.
local function renew_lock(k, r, mode, token, ttl, now_ms, renew)
  if mode == 'x' then
    if redis.call('GET', k) ~= token then return 0 end
    if renew then redis.call('PEXPIRE', k, ttl) end
    return 1
  end
  local s = redis.call('ZSCORE', r, token)
  if (not s) or tonumber(s) < now_ms then
    if s then redis.call('ZREM', r, token) end
    return 0
  end
  local cur = redis.call('GET', k)
  if cur and cur ~= MARKER then
    -- an exclusive holder got in (the marker was broken): this hold is lost
    redis.call('ZREM', r, token)
    return 0
  end
  if renew then
    redis.call('ZADD', r, 'XX', now_ms + ttl, token)
    redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
    refresh_marker(k, r, now_ms)
  end
  return 1
end
-- Removes members of a group whose beat key is gone (except `self`), publishing
-- their departure. Returns nothing.
local function prune_one(g, times, m)
  redis.call('HDEL', g, m)
  redis.call('HDEL', times, m)
  redis.call('PUBLISH', g, 'L' .. m)
end
-- Wakes the oldest live waiter of a lock's queue `q` (registrations in hash `w`:
-- id -> mode letter followed by the expiry in server ms) by publishing
-- `w <id>` on the lock's channel; when it waits to share the lock, the sharing
-- waiters queued right after it are named too. With `readers_only`, only a run of
-- sharing waiters at the head is woken (the lock is held shared). Expired
-- registrations met on the way are removed; when a whole batch was expired, everyone
-- is woken (`released`). Returns the number of waiters named.
local WAKE_BATCH = 64
local function wake_next(k, q, w, readers_only)
  -- pcall: another client's junk in these keys must not fail a release (whoever
  -- waits is then woken by `released`).
  local ids = redis.pcall('ZRANGE', q, 0, WAKE_BATCH - 1)
  if ids['err'] then
    redis.call('PUBLISH', k, 'released')
    return 0
  end
  if #ids == 0 then return 0 end
  local now_ms = math.floor(now_us() / 1000)
  local regs = redis.pcall('HMGET', w, unpack(ids))
  if regs['err'] then
    redis.call('PUBLISH', k, 'released')
    return 0
  end
  local woke, dead = {}, {}
  for i, id in ipairs(ids) do
    local v = regs[i]
    local exp = v and tonumber(string.sub(v, 2))
    if (not exp) or exp < now_ms then
      dead[#dead + 1] = id
    elseif string.sub(v, 1, 1) == 's' then
      woke[#woke + 1] = id
    else
      if #woke == 0 and not readers_only then woke[1] = id end
      break
    end
  end
  if #dead > 0 then
    redis.call('ZREM', q, unpack(dead))
    redis.pcall('HDEL', w, unpack(dead))
  end
  if #woke > 0 then
    redis.call('PUBLISH', k, 'w ' .. table.concat(woke, ' '))
  elseif #dead == WAKE_BATCH then
    redis.call('PUBLISH', k, 'released')
  end
  return #woke
end
