-- Undo one stored copy of a send that failed as a whole: the message, its index
-- entry and its ref record go together, so a retry with the same ref finds
-- either the copy and its record, or neither.
-- KEYS: idx, tally, msg, ref   ARGV: id, use_ref ('1' or '0')
-- Returns 1 when the copy was deleted, 0 when it was gone already.
local idx, tally, msg, ref = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local size = redis.call('STRLEN', msg)
redis.call('DEL', msg)
if ARGV[2] == '1' then
  redis.call('DEL', ref)
end
local removed = redis.call('ZREM', idx, ARGV[1])
release(tally, removed, size)
return removed
