-- Read up to `limit` waiting messages with a sequence above `after`, oldest first,
-- dropping index entries whose message has expired.
-- KEYS: idx   ARGV: msg key prefix, after, limit
-- Returns a flat list {seq, envelope, seq, envelope, ...} (the envelopes without their tag).
local idx, prefix, limit = KEYS[1], ARGV[1], tonumber(ARGV[3])
local out, found = {}, 0
local cursor = '(' .. ARGV[2]
while found < limit do
  local batch = redis.call('ZRANGEBYSCORE', idx, cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, limit - found)
  if #batch == 0 then
    break
  end
  for i = 1, #batch, 2 do
    local envelope = redis.call('GET', prefix .. batch[i])
    if envelope then
      out[#out + 1] = batch[i + 1]
      out[#out + 1] = string.sub(envelope, TAG_BYTES + 2)
      found = found + 1
    else
      redis.call('ZREM', idx, batch[i])
    end
    cursor = '(' .. batch[i + 1]
  end
end
return out
