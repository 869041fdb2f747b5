-- remove_linked_pod_with_id: remove_linked_pod, but only while the link points at the given
-- pod; otherwise change nothing (a pod must not end a link that has moved to another pod).
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  persist_seconds: -1 = delete now, N > 0 = keep as a temporary link for N seconds
-- ARGV[3]  pod id, decimal
-- Reply:   1 if the link existed, pointed at the pod and was removed; else 0.
local current = redis.call('GET', KEYS[2])
if not current or tonumber(current) ~= tonumber(ARGV[3]) then
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
