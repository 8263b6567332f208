-- Shared by the scripts below (prepended when they are loaded).
-- Every key of one mailbox shares the hash tag {mailbox}, so a script touches one slot.

-- A stored message is `tag .. '\n' .. envelope`; the tag is the hash in its ref
-- record's key, or NO_REF when it was sent without a ref.
local TAG_BYTES = 22
local NO_REF = '......................'

-- Drop index entries whose message key has expired; return live count and bytes.
local function purge(idx, msg_prefix)
  local ids = redis.call('ZRANGE', idx, 0, -1)
  local live, bytes, stale = 0, 0, {}
  for _, id in ipairs(ids) do
    local size = redis.call('STRLEN', msg_prefix .. id)
    if size == 0 then
      stale[#stale + 1] = id
    else
      live = live + 1
      bytes = bytes + size
    end
  end
  for i = 1, #stale, 500 do
    redis.call('ZREM', idx, unpack(stale, i, math.min(i + 499, #stale)))
  end
  return live, bytes
end

-- Take `removed` messages of `freed` bytes off the tally; an empty mailbox loses it.
-- (Called after the deletes: on a full Redis the HINCRBY then still runs.)
local function release(idx, tally, removed, freed)
  if removed > 0 and redis.call('EXISTS', tally) == 1 then
    local pending = redis.call('HINCRBY', tally, 'n', -removed)
    redis.call('HINCRBY', tally, 'b', -freed)
    if pending <= 0 and redis.call('EXISTS', idx) == 0 then
      redis.call('DEL', tally)
    end
  end
end
