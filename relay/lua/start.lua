-- A session starts: drop expired index entries, and tell how many messages
-- expired unacknowledged since the last session (pending count minus live).
-- KEYS: idx, tally   ARGV: msg key prefix, retention_ms
-- Returns {expired, live messages, live bytes}.
local idx, tally = KEYS[1], KEYS[2]
local live, bytes = purge(idx, ARGV[1])
local pending = tonumber(redis.call('HGET', tally, 'n') or '0')
local expired = math.max(pending - live, 0)
if live == 0 then
  redis.call('DEL', tally)
else
  redis.call('HSET', tally, 'n', live, 'b', bytes)
  redis.call('PEXPIRE', tally, ARGV[2])
end
return {expired, live, bytes}
