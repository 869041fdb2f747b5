-- try_set_linked_pod: set as set_linked_pod does, unless the user already has a persistent
-- link to a different pod; then change nothing.
-- uses: _link_lib.lua
-- KEYS[1] P:{NS:lk:UID}      the user's persistent-link hash
-- KEYS[2] P:{NS:lk:UID}SVC   the link
-- ARGV[1] service   ARGV[2] pod id (decimal)   ARGV[3] persist_seconds (-1, or N > 0)
-- Reply: {1, pod id} when set; {0, current pod id} when refused.
local current = redis.call('GET', KEYS[2])
if current and tonumber(current) ~= tonumber(ARGV[2]) and is_persistent(KEYS[2]) then
  return {0, current}
end
write_link(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return {1, ARGV[2]}
