-- remove_linked_pod: end the user's link to a service (now, or after a linger of N seconds).
-- uses: _link_lib.lua
-- KEYS[1] P:{NS:lk:UID}      the user's persistent-link hash
-- KEYS[2] P:{NS:lk:UID}SVC   the link
-- ARGV[1] service   ARGV[2] persist_seconds (-1 = delete now, N > 0 = temporary for N more s)
-- Reply: 1 if a link existed, else 0. The service leaves the hash in both cases.
local existed = redis.call('EXISTS', KEYS[2]) == 1
if existed then
  end_link(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if existed then
  return 1
end
return 0
