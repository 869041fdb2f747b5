-- report_pod_load: a pod reports its load (lower is better); stamped with Redis' own clock, so
-- the staleness check in pick_pod compares times from one clock whatever host reported.
-- KEYS[1] P:{NS:state:SVC}load   hash: pod id -> "<load>:<unix ms>"
-- ARGV[1] pod id (decimal)   ARGV[2] load (integer >= 0)
-- Reply: nil.
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. now_ms)
return false
