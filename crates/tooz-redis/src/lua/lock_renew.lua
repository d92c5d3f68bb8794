-- Renews (or only checks) one hold.
-- KEYS: [1] lock key, [2] readers zset.
-- ARGV: [1] token, [2] mode (`x`/`s`), [3] ttl ms, [4] renew (`1`) or check (`0`).
-- Returns 1 when still held, else 0.
local now_ms = math.floor(now_us() / 1000)
return renew_lock(KEYS[1], KEYS[2], ARGV[2], ARGV[1], tonumber(ARGV[3]), now_ms, ARGV[4] == '1')
