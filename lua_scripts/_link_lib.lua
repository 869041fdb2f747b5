-- Shared by the link scripts: scripts.py prepends this file to each script that says
-- `-- uses: _link_lib.lua`, so the link write rules are written once.
--
-- A user's links live in two keys of one hash slot (hash tag {NS:lk:UID}):
--   hash   P:{NS:lk:UID}      field SVC -> pod id, for persistent links only
--   string P:{NS:lk:UID}SVC   pod id; no TTL = persistent, a TTL = temporary

-- Write the link, persistence included. persist_seconds: -1 persistent, N > 0 temporary (TTL N s).
local function write_link(hash_key, link_key, service, pod_id, persist_seconds)
  if persist_seconds == -1 then
    redis.call('SET', link_key, pod_id)
    redis.call('HSET', hash_key, service, pod_id)
  else
    redis.call('SET', link_key, pod_id, 'EX', persist_seconds)
    -- Redis deletes a hash whose last field goes, so an emptied hash never lingers.
    redis.call('HDEL', hash_key, service)
  end
end

-- End the link: -1 deletes it now; N > 0 keeps it N more seconds as a temporary link (so a
-- reconnect in that window lands on the same pod). Either way it stops being persistent at once.
local function end_link(hash_key, link_key, service, persist_seconds)
  if persist_seconds == -1 then
    redis.call('DEL', link_key)
  else
    redis.call('EXPIRE', link_key, persist_seconds)
  end
  redis.call('HDEL', hash_key, service)
end

-- True when the link key exists without a TTL (a persistent link).
local function is_persistent(link_key)
  return redis.call('TTL', link_key) == -1
end
