-- A session starts: drop expired index entries, and tell how many messages
-- expired unacknowledged since the last session (pending count minus live).
-- When a notice is given, publish it on the mailbox's channel: other sessions
-- of the mailbox learn they are replaced.
-- KEYS: idx, tally   ARGV: msg key prefix, retention_ms, channel, notice ('' for none)
-- Returns {expired, live messages, live bytes}.
local idx, tally = KEYS[1], KEYS[2]
local live, bytes = purge(idx, ARGV[1])
local pending = tonumber(redis.call('HGET', tally, 'n') or '0')
local expired = math.max(pending - live, 0)
if live == 0 then
  redis.call('DEL', tally)
else
  -- A full Redis (noeviction) refuses this HSET when nothing expired: then the
  -- refresh is skipped, for the session must start so that the recipient can
  -- drain the mailbox and free the memory.
  redis.pcall('HSET', tally, 'n', live, 'b', bytes)
  redis.call('PEXPIRE', tally, ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return {expired, live, bytes}
