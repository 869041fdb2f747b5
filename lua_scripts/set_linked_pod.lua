-- set_linked_pod: link a user to a pod for one service, always overwriting, persistence included.
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  pod id, decimal
-- ARGV[3]  persist_seconds: -1 = persistent, N > 0 = temporary for N seconds
-- Reply:   the pod id linked before the call (bulk string), or nil when there was none.
-- Both keys' types are checked before anything is written: a call that fails changes nothing.
local hash_type = redis.call('TYPE', KEYS[1]).ok
if hash_type ~= 'none' and hash_type ~= 'hash' then
  return redis.error_reply("WRONGTYPE the user's link hash is not a hash; nothing was changed")
end
local previous = redis.call('GET', KEYS[2])
local persist_seconds = tonumber(ARGV[3])
if persist_seconds == -1 then
  -- SET without EX also clears a TTL the key had: a temporary link becomes persistent.
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'EX', persist_seconds)
  -- Only persistent links are listed; Redis deletes the hash when its last field goes.
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return previous
