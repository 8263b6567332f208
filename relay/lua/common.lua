-- Shared by the scripts below (prepended when they are loaded).
-- Every key of one mailbox shares the hash tag {mailbox}, so a script touches one slot.

-- A stored message is `tag .. '\n' .. envelope`; the tag is the hash in its ref
-- record's key, or NO_REF when it was sent without a ref.
local TAG_BYTES = 22
local NO_REF = '......................'

-- The tally is a cache of what the index holds, so that a send reads one key:
--   n  messages counted (at least the index's entries: fetch drops expired ones
--      without counting them down, so n minus the live messages have expired)
--   b  their bytes (at least the live bytes)
--   s  the highest sequence given out (sequences only grow)
--   m  no counted message expires before this (ms of the Redis clock; 0: none counted)
--   e  messages found expired by a send's recount, not yet reported to a session
-- A tally without `e` (none at all, or one an older relay wrote) is rebuilt from
-- the index; quotas recount before refusing; so every error in it heals.

-- Decimal integers without leading zeros (sequences, times), compared as strings:
-- Lua parses and prints numbers slowly, and these never need arithmetic here.
local function below(a, b)
  return #a < #b or (#a == #b and a < b)
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
    top = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')[2] or '0'
  end
  for i = 1, #stale, 500 do
    redis.call('ZREM', idx, unpack(stale, i, math.min(i + 499, #stale)))
  end
  return live, bytes, soonest, top
end
-- The mailbox's tally: n, b, s, m, e (s a string, the rest numbers; e may be a
-- string too), and whether it was rebuilt from the index (then it is yet to be written).
local function load(idx, tally, msg_prefix)
  local f = redis.call('HMGET', tally, 'n', 'b', 's', 'm', 'e')
  if f[5] then
    return tonumber(f[1]), tonumber(f[2]), f[3], tonumber(f[4]), f[5], false
  end
  local counted = tonumber(f[1] or '0')
  if redis.call('EXISTS', idx) == 0 then
    return 0, 0, '0', 0, counted, true
  end
  local live, bytes, soonest, top = recount(idx, msg_prefix)
  return live, bytes, top, soonest, math.max(counted - live, 0), true
end

-- Write the whole tally, with its TTL. `write` is redis.call or redis.pcall: a full
-- Redis refuses the HSET when nothing was deleted before it.
local function save(tally, n, b, s, m, e, retention_ms, write)
  write('HSET', tally, 'n', n, 'b', b, 's', s, 'm', m, 'e', e)
  redis.call('PEXPIRE', tally, retention_ms)
end

-- Take `removed` index entries of `freed` bytes off the tally. A tally left
-- counting nothing goes (the index is empty then: n is at least its size),
-- unless it still has expired messages to report.
-- (Called after the deletes: on a full Redis the HSET then still runs.)
local function release(tally, removed, freed)
  if removed == 0 then
    return
  end
  local f = redis.call('HMGET', tally, 'n', 'b', 'e')
  if not f[1] then
    return -- no tally: the next send rebuilds it
  end
  local n = tonumber(f[1]) - removed
  if n <= 0 and (f[3] or '0') == '0' then
    redis.call('DEL', tally)
  else
    redis.call('HSET', tally, 'n', math.max(n, 0), 'b', math.max(tonumber(f[2] or '0') - freed, 0))
  end
end
