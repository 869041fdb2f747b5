-- remove_linked_pod: end the user's link to a service, now or after a linger of N seconds
-- (a user who reconnects within the linger lands on the same pod).
--
-- KEYS[1]  P:{NS:lk:UID}      hash: service -> pod id, the user's persistent links only
-- KEYS[2]  P:{NS:lk:UID}SVC   string: the pod id; no TTL = persistent, a TTL = temporary
-- ARGV[1]  service (the field of KEYS[1])
-- ARGV[2]  persist_seconds: -1 = delete now, N > 0 = keep as a temporary link for N seconds
--          (the TTL becomes N even if more was left)
-- Reply:   1 if the link key existed, else 0.
-- Both keys' types are checked before anything is written: a call that fails changes nothing.
local hash_type = redis.call('TYPE', KEYS[1]).ok
if hash_type ~= 'none' and hash_type ~= 'hash' then
  return redis.error_reply("WRONGTYPE the user's link hash is not a hash; nothing was changed")
end
redis.call('GET', KEYS[2])  -- a link key that is not a string fails here, before any write
local persist_seconds = tonumber(ARGV[2])
local existed
if persist_seconds == -1 then
  existed = redis.call('DEL', KEYS[2])
else
  existed = redis.call('EXPIRE', KEYS[2], persist_seconds)
end
-- In every case the link stops being persistent at once; done even when the key was gone,
-- so a hash left inconsistent by another tool heals. An emptied hash is deleted by Redis.
redis.call('HDEL', KEYS[1], ARGV[1])
return existed
