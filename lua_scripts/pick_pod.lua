-- pick_pod: judge the pod a user is linked to, and when it is gone (or there is no link) choose a
-- pod for the user by power of two choices, counting the user into its load at once so that
-- concurrent picks spread instead of piling onto the same least-loaded pod. Runs on the service's
-- slot; linking the user is a second script on the user's slot (replace_linked_pod), which keeps
-- both single-slot for Redis Cluster.
-- KEYS[1] P:{NS:state:SVC}       hash: pod id -> state
-- KEYS[2] P:{NS:state:SVC}load   hash: pod id -> "<load>:<unix ms>"
-- ARGV[1] the linked pod id (decimal), or "" when the user has no link
-- ARGV[2] staleness bound in ms (a report this old is not used for placement)
-- ARGV[3] gone bound in ms (a report this old makes its pod gone)
-- ARGV[4], ARGV[5] two random numbers in [0, 1)
-- ARGV[6] n, the number of routable states; ARGV[7 .. 6+n] the routable states;
-- ARGV[7+n ..] the gone states
-- Reply: 0 (integer) when the linked pod is alive: nothing was chosen or written. Otherwise the
-- chosen pod id (bulk string), or nil when no pod is routable with a report fresher than ARGV[2]
-- (by Redis' clock).
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local stale_ms = tonumber(ARGV[2])
local gone_ms = tonumber(ARGV[3])
local n_routable = tonumber(ARGV[6])

local routable, gone = {}, {}
for i = 7, 6 + n_routable do
  routable[ARGV[i]] = true
end
for i = 7 + n_routable, #ARGV do
  gone[ARGV[i]] = true
end

-- A pod is gone with no state, a gone state, or a load report gone_ms old (SPEC 2c). A report
-- that is not "<load>:<ms>" (another tool's data) neither keeps a pod alive nor makes it gone.
local linked = ARGV[1]
if linked ~= '' then
  local state = redis.call('HGET', KEYS[1], linked)
  if state and not gone[state] then
    local report = redis.call('HGET', KEYS[2], linked)
    local stamp = report and string.match(report, '^%d+:(%d+)$')
    if not stamp or now_ms - tonumber(stamp) < gone_ms then
      return 0
    end
  end
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
  -- A gone pod is never eligible: its state is not routable or its report is stale, since the
  -- daemon refuses a gone state that is routable and a gone bound not above the stale bound.
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
  local a = math.floor(tonumber(ARGV[4]) * n) + 1
  local b = math.floor(tonumber(ARGV[5]) * (n - 1)) + 1
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
