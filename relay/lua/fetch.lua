-- Read up to `limit` waiting messages with a sequence above `after`, oldest first,
-- dropping index entries whose message has expired.
-- KEYS: idx   ARGV: msg key prefix, after, limit
-- Returns a flat list {seq, value, seq, value, ...}: the stored values, `tag\nenvelope`.
local idx, prefix, limit = KEYS[1], ARGV[1], tonumber(ARGV[3])
local out, found = {}, 0
local cursor = '(' .. ARGV[2]
while found < limit do
  local page = math.min(limit - found, 1000)
  local batch = redis.call('ZRANGEBYSCORE', idx, cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, page)
  if #batch == 0 then
    break
  end
  local keys = {}
  for i = 1, #batch, 2 do
    keys[#keys + 1] = prefix .. batch[i]
  end
  local stale = {}
  for k, value in ipairs(redis.call('MGET', unpack(keys))) do
    if value then
      out[#out + 1] = batch[2 * k]
      out[#out + 1] = value -- with its tag: taken off by the caller, for Lua would copy it
      found = found + 1
    else
      stale[#stale + 1] = batch[2 * k - 1]
    end
  end
  if #stale > 0 then
    redis.call('ZREM', idx, unpack(stale))
  end
  cursor = '(' .. batch[#batch]
end
return out
