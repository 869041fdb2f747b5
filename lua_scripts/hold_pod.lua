-- hold_pod: write a pod's state and a fresh load report in one step, as a pod's holder does when
-- it takes or changes its hold (the heartbeats that follow refresh the report alone).
-- KEYS[1] P:{NS:state:SVC}       hash: pod id -> state
-- KEYS[2] P:{NS:state:SVC}load   hash: pod id -> "<load>:<unix ms>"
-- ARGV[1] pod id (decimal)   ARGV[2] state   ARGV[3] load (integer >= 0)
-- Reply: nil.
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ':' .. now_ms)
return false
