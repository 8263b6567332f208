-- The storage's epoch: read it, or make it when Redis lost it; refresh its TTL.
-- (PEXPIRE first: on a full Redis an existing epoch is still read and kept.)
-- KEYS: epoch   ARGV: a new epoch (used only when none is stored), retention_ms
-- Returns the current epoch.
local epoch = redis.call('GET', KEYS[1])
if epoch then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return epoch
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
