-- set_linked_pod_if_absent: link the user only when no link exists, persistent or temporary;
-- an existing link is left exactly as it is (value and TTL).
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  pod id, decimal
-- ARGV[3]  persist_seconds: -1 = persistent, N > 0 = temporary for N seconds
-- Reply:   the pod id linked after the call (bulk string): the existing one, else ARGV[2].
-- Both keys' types are checked before anything is written: a call that fails changes nothing.
local hash_type = redis.call('TYPE', KEYS[1]).ok
if hash_type ~= 'none' and hash_type ~= 'hash' then
  return redis.error_reply("WRONGTYPE the user's link hash is not a hash; nothing was changed")
end
local current = redis.call('GET', KEYS[2])
if current then
  return current
end
local persist_seconds = tonumber(ARGV[3])
if persist_seconds == -1 then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'EX', persist_seconds)
  -- A stale field (left by another tool) must not make a temporary link look persistent.
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return ARGV[2]
