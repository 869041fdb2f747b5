-- remove_linked_pod_with_id: remove_linked_pod, but only while the link points at the given
-- pod; otherwise change nothing (a pod must not end a link that has moved to another pod).
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  persist_seconds: -1 = delete now, N > 0 = keep as a temporary link for N seconds
-- ARGV[3]  pod id, decimal
-- Reply:   1 if the link existed, pointed at the pod and was removed; else 0.
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
if not current or pod_id(current) ~= tonumber(ARGV[3]) then
  return 0
end
local persist_seconds = tonumber(ARGV[2])
if persist_seconds == -1 then
  redis.call('DEL', KEYS[2])
else
  redis.call('EXPIRE', KEYS[2], persist_seconds)
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
