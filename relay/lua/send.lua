-- Store one copy of a message for one recipient, index it, and publish it.
-- KEYS: idx, tally, msg, ref
-- ARGV: id, envelope, ttl_ms, max_messages, max_bytes, channel,
--       use_ref ('1' or '0'), ref record value, retention_ms, fingerprint, tag
-- The stored value is `tag .. '\n' .. envelope`: the tag names the message's ref
-- record (its hash, or NO_REF), so the ack can shorten that record's life.
-- A ref record holds "<id> <expires_at_ms> <fingerprint>".
-- Idempotent: a second run with the same id stores and publishes nothing more.
-- Returns {0, seq} when stored, {1, ref record} when the same request was seen
-- before (nothing stored), {2} when the ref was used for another request,
-- {-1, 'messages' | 'bytes', limit} when the mailbox is full.
local idx, tally, msg, ref = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, envelope, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_messages, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])

if ARGV[7] == '1' then
  local prior = redis.call('GET', ref)
  if prior then
    if string.sub(prior, -#ARGV[10] - 1) ~= ' ' .. ARGV[10] then
      return {2}
    end
    return {1, prior}
  end
end

-- Run again with the same id (a retry after a lost reply): it is stored already.
local stored = redis.call('ZSCORE', idx, id)
if stored then
  return {0, stored}
end

local value = ARGV[11] .. '\n' .. envelope
local size = #value
local count = redis.call('ZCARD', idx)
local bytes = tonumber(redis.call('HGET', tally, 'b') or '0')
if count >= max_messages or bytes + size > max_bytes then
  -- The counts may include expired messages: recount before refusing.
  count, bytes = purge(idx, string.sub(msg, 1, #msg - #id))
  if redis.call('EXISTS', tally) == 1 then
    redis.call('HSET', tally, 'b', bytes)
  end
  if count >= max_messages then
    return {-1, 'messages', max_messages}
  end
  if bytes + size > max_bytes then
    return {-1, 'bytes', max_bytes}
  end
end

-- Sequence: microseconds of the Redis clock, strictly increasing per mailbox.
local now = redis.call('TIME')
local seq = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')
if last[2] and tonumber(last[2]) >= seq then
  seq = tonumber(last[2]) + 1
end
seq = string.format('%.0f', seq)

redis.call('SET', msg, value, 'PX', ttl_ms)
redis.call('ZADD', idx, seq, id)
if redis.call('PTTL', idx) < ttl_ms then
  redis.call('PEXPIRE', idx, ttl_ms)
end
redis.call('HINCRBY', tally, 'n', 1)
redis.call('HINCRBY', tally, 'b', size)
redis.call('PEXPIRE', tally, ARGV[9])
if ARGV[7] == '1' then
  redis.call('SET', ref, ARGV[8], 'PX', ttl_ms)
end
redis.call('PUBLISH', ARGV[6], seq .. ' ' .. envelope)
return {0, seq}
