-- set_linked_pod: link a user to a pod for one service, always overwriting (persistence too).
-- uses: _link_lib.lua
-- KEYS[1] P:{NS:lk:UID}      the user's persistent-link hash
-- KEYS[2] P:{NS:lk:UID}SVC   the link
-- ARGV[1] service   ARGV[2] pod id (decimal)   ARGV[3] persist_seconds (-1, or N > 0)
-- Reply: the pod id linked before the call (bulk string), or nil.
local previous = redis.call('GET', KEYS[2])
write_link(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return previous
