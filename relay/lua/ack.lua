-- Delete acknowledged messages of one mailbox. Unknown, expired or already
-- deleted ids are ignored. When the mailbox is left empty its keys go too.
-- The ref record of each deleted message is cut to the dedupe window (a late
-- retry still converges; after it nothing about the message remains).
-- KEYS: idx, tally, msg keys...
-- ARGV: dedupe_ms, ref key prefix, ids... (in the order of the msg keys)
-- Returns how many messages were deleted.
local idx, tally = KEYS[1], KEYS[2]
local dedupe_ms, ref_prefix = ARGV[1], ARGV[2]
local deleted, freed = 0, 0
for i = 3, #KEYS do
  -- (Not GETDEL: the body would be copied into Lua, which costs more than two calls.)
  local size = redis.call('STRLEN', KEYS[i])
  if size > 0 then
    local tag = redis.call('GETRANGE', KEYS[i], 0, TAG_BYTES - 1)
    redis.call('DEL', KEYS[i])
    deleted = deleted + 1
    freed = freed + size
    if tag ~= NO_REF then
      redis.call('PEXPIRE', ref_prefix .. tag, dedupe_ms, 'LT')
    end
  end
end
local removed = 0
for i = 3, #ARGV, 500 do
  removed = removed + redis.call('ZREM', idx, unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
release(tally, removed, freed)
return deleted
