-- Shared by the scripts below (prepended when they are loaded).
-- Every key of one mailbox shares the hash tag {mailbox}, so a script touches one slot.

-- A stored message is `tag .. '\n' .. envelope`; the tag is the hash in its ref
-- record's key, or NO_REF when it was sent without a ref.
local TAG_BYTES = 22
local NO_REF = '......................'

-- Take `removed` index entries of `freed` bytes off the tally (see tally.lua). A
-- tally left counting nothing goes: then the index is empty (n is at least its
-- size) and no expired message waits to be reported (those are in n too).
-- HINCRBY creates a tally that is missing, and the DEL below removes it again
-- within the same script: no client ever sees a key without a TTL.
-- (Called after the deletes: on a full Redis the HINCRBY then still runs.)
local function release(tally, removed, freed)
  if removed == 0 then
    return
  end
  if redis.call('HINCRBY', tally, 'n', -removed) <= 0 then
    redis.call('DEL', tally)
  elseif freed > 0 and redis.call('HINCRBY', tally, 'b', -freed) < 0 then
    redis.call('HSET', tally, 'b', 0)
  end
end
