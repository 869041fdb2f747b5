-- get_linked_pod_if_persist: the user's pod for a service, but only if the link is persistent.
-- A script so that the value and its TTL are read at one instant.
--
-- KEYS[1]  P:{NS:lk:UID}      hash: not read; passed so every link script is called alike
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV     none
-- Reply:   the pod id (bulk string), or nil when there is no link or it is temporary.
local current = redis.call('GET', KEYS[2])
if current and redis.call('TTL', KEYS[2]) == -1 then
  return current
end
return false
