-- Store copies of messages for one recipient, index them, and publish each.
-- KEYS: idx, tally, msg, ref (the first message's), channel (a key: SPUBLISH shares
--       the mailbox's cluster slot)
-- ARGV: of the first message: id, envelope, ttl_ms, max_messages, max_bytes,
--       publish ('PUBLISH' or, on a cluster, 'SPUBLISH'),
--       use_ref ('1' or '0'), ref record value, retention_ms, fingerprint, tag;
--       of each further one: id, envelope, ttl_ms, ref record value ('' for none),
--       tag (its keys are named as the first one's are)
-- Several messages in one run (the pump joins the sends to one mailbox that meet in
-- a batch) are stored as if one run each, in their order, and share the reads and
-- writes of the index and the tally.
-- The stored value is `tag .. '\n' .. envelope`: the tag names the message's ref
-- record (its hash, or NO_REF), so the ack can shorten that record's life.
-- A ref record holds "<id> <expires_at_ms> <fingerprint>".
-- Idempotent: a second run with the same id stores and publishes nothing more.
-- A message's result is {0, seq} when stored, {1, ref record} when the same request
-- was seen before (nothing stored), {2} when the ref was used for another request,
-- {-1, 'messages' | 'bytes', limit} when the mailbox is full. Returns the result of
-- a lone message; for several, their results one after the other, each padded with ''
-- to three values.
local LONG_BYTES = 1024
local idx, tally = KEYS[1], KEYS[2]
local max_messages, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local channel, publish, retention_ms = KEYS[5], ARGV[6], ARGV[9]
local msg_prefix = string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[1])
local ref_prefix = string.sub(msg_prefix, 1, -5) .. 'ref:' -- '<mailbox base>msg:' less 'msg:'

local n, b, s, m, e, recounted = load(idx, tally, msg_prefix)
local fresh = n == e -- most likely a new index
local now, now_ms = clock()
local single = #ARGV == 11
local longest, kind, first, second = 0, 0, '', '' -- the longest expiry; a result
local ttl_text, ttl = nil, 0 -- the last ttl parsed (the messages of a batch share theirs)
local pending, results -- several messages: their index entries and results
if not single then
  pending, results = {}, {}
end

for i = 1, 1 + (#ARGV - 11) / 5 do
  local msg, ref, id, envelope, ttl_ms, use_ref, record, fingerprint, tag
  if i == 1 then
    msg, ref, id, envelope, ttl_ms = KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3]
    use_ref, record, fingerprint, tag = ARGV[7], ARGV[8], ARGV[10], ARGV[11]
  else
    local a = 11 + 5 * (i - 2)
    id, envelope, ttl_ms, record, tag = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
    msg, ref = msg_prefix .. id, ref_prefix .. tag
    use_ref = record == '' and '0' or '1'
    fingerprint = string.sub(record, -TAG_BYTES) -- "<id> <expires_at_ms> <fingerprint>"
  end
  if ttl_ms ~= ttl_text then
    ttl_text, ttl = ttl_ms, tonumber(ttl_ms)
  end
  local expires = now_ms + ttl
  local size = TAG_BYTES + 1 + #envelope -- of the stored `tag .. '\n' .. envelope`
  repeat -- `break` once the result is known
    if use_ref == '1' then
      local prior = redis.call('SET', ref, record, 'PXAT', expires, 'NX', 'GET')
      if prior then
        if string.sub(prior, -#fingerprint - 1) ~= ' ' .. fingerprint then
          kind, first, second = 2, '', ''
        else
          kind, first, second = 1, prior, ''
        end
        break
      end
    end
    if n - e >= max_messages or b + size > max_bytes then
      -- Run again with the same id (a retry after a lost reply): it is stored already.
      local stored = redis.call('ZSCORE', idx, id)
      if stored then
        kind, first, second = 0, stored, ''
        break
      end
      -- The tally may count expired messages: recount before refusing.
      if not recounted then
        if pending and #pending > 0 then
          redis.call('ZADD', idx, unpack(pending))
          pending = {}
        end
        local live, bytes, soonest, top = recount(idx, msg_prefix)
        n, b, m, e = math.max(n, live), bytes, soonest, math.max(n - live, 0)
        if below(s, top) then
          s = top
        end
        recounted = true
      end
      if n - e >= max_messages or b + size > max_bytes then
        if use_ref == '1' then
          redis.call('DEL', ref)
        end
        if n - e >= max_messages then
          kind, first, second = -1, 'messages', max_messages
        else
          kind, first, second = -1, 'bytes', max_bytes
        end
        break
      end
    end
    -- A long envelope is appended rather than joined to its tag here: Lua would copy
    -- and hash the whole body once more.
    local long = #envelope > LONG_BYTES
    if not redis.call('SET', msg, long and tag .. '\n' or tag .. '\n' .. envelope, 'PXAT', expires, 'NX') then
      kind, first, second = 0, redis.call('ZSCORE', idx, id) or '', '' -- run again with the same id
      break
    end
    if long then
      redis.call('APPEND', msg, envelope)
    end
    -- Sequence: microseconds of the Redis clock, strictly increasing per mailbox.
    if below(s, now) then
      s = now
    else
      s = next_integer(s)
    end
    if single then
      redis.call('ZADD', idx, s, id)
    else
      pending[#pending + 1] = s
      pending[#pending + 1] = id
    end
    redis.call(publish, channel, s .. ' ' .. envelope)
    if n == e or expires < m then
      m = expires
    end
    n, b, longest = n + 1, b + size, math.max(longest, expires)
    kind, first, second = 0, s, ''
  until true
  if not single then -- flat: three values a message (the reply is cheaper to make)
    results[3 * i - 2], results[3 * i - 1], results[3 * i] = kind, first, second
  end
end

if longest > 0 then
  if pending and #pending > 0 then
    redis.call('ZADD', idx, unpack(pending))
  end
  -- The index lives as long as its longest-lived message: extend, never shorten, and
  -- never leave it without a TTL (NX sets one only where there is none).
  local try, otherwise = 'GT', 'NX'
  if fresh then
    try, otherwise = 'NX', 'GT'
  end
  if redis.call('PEXPIREAT', idx, longest, try) == 0 then
    redis.call('PEXPIREAT', idx, longest, otherwise)
  end
  save(tally, n, b, s, m, e, retention_ms, redis.call)
elseif recounted then
  if n == 0 then
    redis.call('DEL', tally) -- counts nothing: not kept
  else
    save(tally, n, b, s, m, e, retention_ms, redis.pcall)
  end
end
if single then
  if kind == 2 then
    return {2}
  elseif kind == -1 then
    return {-1, first, second}
  end
  return {kind, first}
end
return results
