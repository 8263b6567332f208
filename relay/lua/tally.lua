-- The tally (prepended to send.lua and start.lua, after common.lua) caches what the
-- index holds, so that a send reads one key and a session start no index at all
-- unless a message may have expired:
--   n  messages counted: those indexed, and those found expired and not yet
--      reported to a session (fetch drops expired entries without counting them
--      down; n minus the live messages have expired)
--   e  how many of n a send's recount found expired (they left the index then)
--   b  bytes of the indexed messages (at least the live bytes)
--   s  the highest sequence given out (sequences only grow)
--   m  no indexed message expires before this (ms of the Redis clock; 0: none)
-- A tally without `e` (none at all, or one an older relay wrote) is rebuilt from
-- the index; quotas recount before refusing; so every error in it heals.

-- Decimal integers without leading zeros (sequences, times), compared as strings:
-- Lua parses and prints numbers slowly, and these never need arithmetic here.
local function below(a, b)
  return #a < #b or (#a == #b and a < b)
end

-- d + 1, for a decimal integer d written as a string (a sequence that must grow
-- past the clock: rare).
local function next_integer(d)
  local i = #d
  while i > 0 and string.byte(d, i) == 57 do -- '9'
    i = i - 1
  end
  if i == 0 then
    return '1' .. string.rep('0', #d)
  end
  return string.sub(d, 1, i - 1) .. string.char(string.byte(d, i) + 1) .. string.rep('0', #d - i)
end

-- The Redis clock: microseconds as a decimal string, and milliseconds as a number.
local function clock()
  local now = redis.call('TIME')
  local us = now[1] .. string.rep('0', 6 - #now[2]) .. now[2]
  return us, tonumber(string.sub(us, 1, -4))
end

-- Recount the messages of an index: drop entries whose message has expired, and
-- return the live count, their bytes, their earliest expiry (0: none) and the
-- highest sequence the index held (a string; '0': none).
local function recount(idx, msg_prefix)
  local entries = redis.call('ZRANGE', idx, 0, -1, 'WITHSCORES')
  local live, bytes, soonest, top, stale = 0, 0, 0, '0', {}
  for i = 1, #entries, 2 do
    local key = msg_prefix .. entries[i]
    local size = redis.call('STRLEN', key)
    if size == 0 then
      stale[#stale + 1] = entries[i]
    else
      live = live + 1
      bytes = bytes + size
      local expiry = redis.call('PEXPIRETIME', key)
      if expiry > 0 and (soonest == 0 or expiry < soonest) then
        soonest = expiry
      end
    end
  end
  if #entries > 0 then
    top = entries[#entries] -- by score, the highest last
  end
  for i = 1, #stale, 500 do
    redis.call('ZREM', idx, unpack(stale, i, math.min(i + 499, #stale)))
  end
  return live, bytes, soonest, top
end

-- The mailbox's tally: n, b, s, m, e (s a string, the rest numbers), and whether it
-- was rebuilt (then it is yet to be written). No tally and no index: an empty
-- mailbox, nothing to rebuild.
local function load(idx, tally, msg_prefix)
  local f = redis.call('HMGET', tally, 'n', 'b', 's', 'm', 'e')
  if f[5] then
    return tonumber(f[1]), tonumber(f[2]), f[3], tonumber(f[4]), tonumber(f[5]), false
  end
  local counted = tonumber(f[1] or '0')
  if redis.call('EXISTS', idx) == 0 then
    return counted, 0, '0', 0, counted, f[1] ~= false
  end
  local live, bytes, soonest, top = recount(idx, msg_prefix)
  local expired = math.max(counted - live, 0)
  return live + expired, bytes, top, soonest, expired, true
end

-- Write the whole tally, with its TTL. `write` is redis.call or redis.pcall: a full
-- Redis refuses the HSET when nothing was deleted before it.
local function save(tally, n, b, s, m, e, retention_ms, write)
  write('HSET', tally, 'n', n, 'b', b, 's', s, 'm', m, 'e', e)
  redis.call('PEXPIRE', tally, retention_ms)
end

