-- set_linked_pod_if_absent: link the user only when no link (persistent or temporary) exists.
-- uses: _link_lib.lua
-- KEYS[1] P:{NS:lk:UID}      the user's persistent-link hash
-- KEYS[2] P:{NS:lk:UID}SVC   the link
-- ARGV[1] service   ARGV[2] pod id (decimal)   ARGV[3] persist_seconds (-1, or N > 0)
-- Reply: the pod id linked after the call: the existing one (unchanged), else ARGV[2].
local current = redis.call('GET', KEYS[2])
if current then
  return current
end
write_link(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return ARGV[2]
