-- replace_linked_pod: link the user to a pod only if the link still holds what the caller read
-- (a compare-and-set on the user's slot), so that of many callers routing one user at once
-- exactly one changes the link and the others learn what it now is.
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  the value the caller read from KEYS[2], or "" for no link
-- ARGV[3]  the new pod id, decimal
-- ARGV[4]  persist_seconds: -1 = persistent, N > 0 = temporary for N seconds
-- Reply:   {1, ARGV[3]} when the link was written; {0, current} when it was not because the link
--          changed meanwhile (current: its value, or nil when it was removed).
-- Both keys' types are checked before anything is written: a call that fails changes nothing.
local hash_type = redis.call('TYPE', KEYS[1]).ok
if hash_type ~= 'none' and hash_type ~= 'hash' then
  return redis.error_reply("WRONGTYPE the user's link hash is not a hash; nothing was changed")
end
local current = redis.call('GET', KEYS[2])
if (current or '') ~= ARGV[2] then
  return {0, current}
end
local persist_seconds = tonumber(ARGV[4])
if persist_seconds == -1 then
  redis.call('SET', KEYS[2], ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
else
  redis.call('SET', KEYS[2], ARGV[3], 'EX', persist_seconds)
  -- A stale field (left by another tool) must not make a temporary link look persistent.
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {1, ARGV[3]}
