-- get_linked_pod_if_persist: the linked pod, but only if the link is persistent (no TTL).
-- A script so that the value and its TTL are read at one instant.
-- uses: _link_lib.lua
-- KEYS[1] P:{NS:lk:UID}SVC   the link
-- ARGV    none
-- Reply: the pod id (bulk string), or nil when there is no link or it is temporary.
local current = redis.call('GET', KEYS[1])
if current and is_persistent(KEYS[1]) then
  return current
end
return false
