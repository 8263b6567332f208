-- Delete acknowledged messages of one mailbox. Unknown, expired or already
-- deleted ids are ignored. When the mailbox is left empty its keys go too.
-- The ref record of each deleted message is cut to the dedupe window (a late
-- retry still converges; after it nothing about the message remains).
-- KEYS: idx, tally, msg keys...
-- ARGV: dedupe_ms, ref key prefix, ids... (in the order of the msg keys)
-- Returns how many messages were deleted.
local HEAD_BYTES = 1024
local idx, tally = KEYS[1], KEYS[2]
local dedupe_ms, ref_prefix = ARGV[1], ARGV[2]
local deleted, freed = 0, 0
for i = 3, #KEYS do
  -- The head of the value holds its tag and, for a short message, all of it (then its
  -- size is known without STRLEN); a long body is not copied into Lua (no GETDEL).
  local head = redis.call('GETRANGE', KEYS[i], 0, HEAD_BYTES - 1)
  if head ~= '' then
    if #head < HEAD_BYTES then
      freed = freed + #head
    else
      freed = freed + redis.call('STRLEN', KEYS[i])
    end
    redis.call('DEL', KEYS[i])
    deleted = deleted + 1
    local tag = string.sub(head, 1, TAG_BYTES)
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
