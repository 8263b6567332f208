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
local id, envelope = ARGV[1], ARGV[2]
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

local msg_prefix = string.sub(msg, 1, #msg - #id)
local n, b, s, m, e, rebuilt = load(idx, tally, msg_prefix)
local value = ARGV[11] .. '\n' .. envelope
local size = #value
if n >= max_messages or b + size > max_bytes then
  -- Run again with the same id (a retry after a lost reply): it is stored already.
  local stored = redis.call('ZSCORE', idx, id)
  if stored then
    return {0, stored}
  end
  -- The tally may count expired messages: recount before refusing.
  if not rebuilt then
    local live, bytes, soonest, top = recount(idx, msg_prefix)
    n, b, m, e = live, bytes, soonest, tonumber(e) + math.max(n - live, 0)
    if below(s, top) then
      s = top
    end
    rebuilt = true
  end
  if n >= max_messages or b + size > max_bytes then
    save(tally, n, b, s, m, e, ARGV[9], redis.pcall)
    if n >= max_messages then
      return {-1, 'messages', max_messages}
    end
    return {-1, 'bytes', max_bytes}
  end
end

-- Sequence: microseconds of the Redis clock, strictly increasing per mailbox.
local seq, now_ms = clock()
if not below(s, seq) then
  seq = string.format('%.0f', tonumber(s) + 1)
end
local expires = now_ms + tonumber(ARGV[3])

if not redis.call('SET', msg, value, 'PXAT', expires, 'NX') then
  return {0, redis.call('ZSCORE', idx, id)} -- run again with the same id
end
local added = redis.call('ZADD', idx, seq, id)
-- The index lives as long as its longest-lived message: extend, never shorten, and
-- never leave it without a TTL (NX sets one only where there is none).
local first, second = 'GT', 'NX'
if n == 0 then
  first, second = 'NX', 'GT' -- most likely a new index
end
if redis.call('PEXPIREAT', idx, expires, first) == 0 then
  redis.call('PEXPIREAT', idx, expires, second)
end

if n == 0 or expires < m then
  m = expires
end
save(tally, n + added, b + size, seq, m, e, ARGV[9], redis.call)
if ARGV[7] == '1' then
  redis.call('SET', ref, ARGV[8], 'PXAT', expires)
end
redis.call('PUBLISH', ARGV[6], seq .. ' ' .. envelope)
return {0, seq}
