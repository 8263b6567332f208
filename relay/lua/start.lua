-- A session starts: tell how many messages expired unacknowledged since the last
-- session, dropping their index entries. The tally says when that needs a look at
-- the index: only when an indexed message may have expired since the last recount,
-- or when the index holds more than the tally counts (a tally gone wrong).
-- When a notice is given, publish it on the mailbox's channel: other sessions
-- of the mailbox learn they are replaced.
-- KEYS: idx, tally, channel
-- ARGV: msg key prefix, retention_ms, publish ('PUBLISH' or 'SPUBLISH'), notice ('' for none)
-- Returns {expired, live messages, live bytes}.
local idx, tally = KEYS[1], KEYS[2]
local n, b, s, m, e, changed = load(idx, tally, ARGV[1])
local expired = e
if
  not changed
  and ((n > e and select(2, clock()) >= m) or redis.call('ZCARD', idx) > n - e)
then
  local live, bytes, soonest, top = recount(idx, ARGV[1])
  expired = math.max(n - live, 0)
  n, b, m = live + expired, bytes, soonest
  if below(s, top) then
    s = top
  end
  changed = true
end
n = n - expired
if n <= 0 then
  redis.call('DEL', tally)
elseif changed or expired > 0 then
  -- A full Redis (noeviction) refuses this HSET when nothing expired: then the
  -- refresh is skipped, for the session must start so that the recipient can
  -- drain the mailbox and free the memory.
  save(tally, n, b, s, m, 0, ARGV[2], redis.pcall)
end
if ARGV[4] ~= '' then
  redis.call(ARGV[3], KEYS[3], ARGV[4])
end
return {expired, n, b}
