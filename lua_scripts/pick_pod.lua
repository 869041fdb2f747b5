-- pick_pod: choose a pod for a new user by power of two choices and count the user into its
-- load at once, so concurrent picks spread instead of piling onto the same least-loaded pod.
-- Runs on the service's slot; linking the user is a second script on the user's slot
-- (compute_linked_pod in executor.py), which keeps both single-slot for Redis Cluster.
-- KEYS[1] P:{NS:state:SVC}       hash: pod id -> state
-- KEYS[2] P:{NS:state:SVC}load   hash: pod id -> "<load>:<unix ms>"
-- ARGV[1] staleness bound in ms   ARGV[2], ARGV[3] two random numbers in [0, 1)
-- ARGV[4..] the routable states
-- Reply: the chosen pod id (bulk string), or nil when no pod is routable with a fresh report
-- (one less than ARGV[1] ms old by Redis' clock).
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local stale_ms = tonumber(ARGV[1])

local routable = {}
for i = 4, #ARGV do
  routable[ARGV[i]] = true
end

local loads = {}
local flat_loads = redis.call('HGETALL', KEYS[2])
for i = 1, #flat_loads, 2 do
  loads[flat_loads[i]] = flat_loads[i + 1]
end

local eligible = {}
local states = redis.call('HGETALL', KEYS[1])
for i = 1, #states, 2 do
  local pod, state = states[i], states[i + 1]
  local report = loads[pod]
  -- Only pod ids (decimal, 0..2^31-1): another tool's larger number must never get a user.
  if routable[state] and report and string.match(pod, '^%d+$') and tonumber(pod) <= 2147483647 then
    local load, stamp = string.match(report, '^(%d+):(%d+)$')
    -- Fresher than the bound (SPEC 2b): a report exactly stale_ms old is stale.
    if load and now_ms - tonumber(stamp) < stale_ms then
      eligible[#eligible + 1] = {pod = pod, load = tonumber(load), stamp = stamp}
    end
  end
end

local n = #eligible
if n == 0 then
  return false
end
local chosen = eligible[1]
if n > 1 then
  local a = math.floor(tonumber(ARGV[2]) * n) + 1
  local b = math.floor(tonumber(ARGV[3]) * (n - 1)) + 1
  if b >= a then
    b = b + 1  -- two distinct pods
  end
  chosen = eligible[a]
  if eligible[b].load < chosen.load then
    chosen = eligible[b]
  end
end
-- The report's timestamp is kept: only the pod's own reports make it fresh.
redis.call('HSET', KEYS[2], chosen.pod, string.format('%d', chosen.load + 1) .. ':' .. chosen.stamp)
return chosen.pod
