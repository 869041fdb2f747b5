-- remove_linked_pod_with_id: remove_linked_pod, but only if the link points at the given pod;
-- otherwise change nothing (a pod must not end a link that has moved to another pod).
-- uses: _link_lib.lua
-- KEYS[1] P:{NS:lk:UID}      the user's persistent-link hash
-- KEYS[2] P:{NS:lk:UID}SVC   the link
-- ARGV[1] service   ARGV[2] persist_seconds (-1 or N > 0)   ARGV[3] pod id (decimal)
-- Reply: 1 if the link existed, pointed at the pod, and was removed; else 0.
local current = redis.call('GET', KEYS[2])
if not current or tonumber(current) ~= tonumber(ARGV[3]) then
  return 0
end
end_link(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
return 1
