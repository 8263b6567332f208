-- Read up to `limit` waiting messages with a sequence above `after`, oldest first,
-- dropping index entries whose message has expired. The read also stops once the
-- values it holds reach `max_bytes` (checked every CHUNK messages, so it holds at most
-- CHUNK messages more): a page of large messages stays small.
-- KEYS: idx   ARGV: msg key prefix, after, limit, max_bytes
-- Returns {more, seq, value, seq, value, ...}: `more` is 1 when the read stopped at its
-- limit or its byte budget (more may wait), 0 when no message was left; the stored
-- values are `tag\nenvelope`.
local CHUNK = 32
local idx, prefix = KEYS[1], ARGV[1]
local limit, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, found, bytes, more = { 0 }, 0, 0, 0
local cursor = '(' .. ARGV[2]
while true do
  if found >= limit or bytes >= max_bytes then
    more = 1
    break
  end
  local page = math.min(limit - found, CHUNK)
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
      bytes = bytes + #value
    else
      stale[#stale + 1] = batch[2 * k - 1]
    end
  end
  if #stale > 0 then
    redis.call('ZREM', idx, unpack(stale))
  end
  cursor = '(' .. batch[#batch]
end
out[1] = more
return out
