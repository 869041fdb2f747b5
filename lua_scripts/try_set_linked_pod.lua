-- try_set_linked_pod: set as set_linked_pod does, unless the user already has a persistent
-- link to a different pod; then change nothing. A temporary link (a linger after a remove)
-- does not hold the user, a persistent one does.
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  pod id, decimal
-- ARGV[3]  persist_seconds: -1 = persistent, N > 0 = temporary for N seconds
-- Reply:   {1, pod id} when the link was set; {0, current pod id} when it was refused.
-- A pod id is ASCII decimal digits, 0..2^31-1, as the daemon reads one; anything else is no pod.
local function pod_id(value)
  if value and string.match(value, '^%d+$') and tonumber(value) <= 2147483647 then
    return tonumber(value)
  end
  return nil
end
-- Both keys' types are checked before anything is written: a call that fails changes nothing.
local hash_type = redis.call('TYPE', KEYS[1]).ok
if hash_type ~= 'none' and hash_type ~= 'hash' then
  return redis.error_reply("WRONGTYPE the user's link hash is not a hash; nothing was changed")
end
local current = redis.call('GET', KEYS[2])
-- Compared as pod ids: another tool may have written "007" for pod 7 (but "0x7" is no pod).
if current and pod_id(current) ~= tonumber(ARGV[2]) and redis.call('TTL', KEYS[2]) == -1 then
  return {0, current}
end
local persist_seconds = tonumber(ARGV[3])
if persist_seconds == -1 then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'EX', persist_seconds)
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {1, ARGV[2]}
