-- wrk script: a frontend-like mix of purchase.list, purchase.get, purchase.create and
-- purchase.fulfill calls by several users, each call a single JSON-RPC request.
--
-- Environment: BENCH_PLAN, BENCH_THREADS, BENCH_RESULT as in replay.lua. The plan's first
-- line is "mixed", then tab-separated lines:
--   pattern <letters>     the repeating sequence of calls: L list, G get, C create, F fulfill
--   tag <text>            makes this run's idempotency keys unique
--   course <slug>         courses to buy (one line each), each bought once: a user
--                         registered for a course cannot buy it again
--   payments <Authorization>  the payment backend (a payments-scope token)
--   user <Authorization>  a user (numbered 1, 2, ... in order)
--   own <user> <id>       a purchase of that user, for purchase.get
--   fresh <user> <id>     a pending purchase of that user, to fulfill once
-- Each call goes to a random user. purchase.create buys the thread's next unused course
-- (past the last one it starts over and counts "exhausted": those creates may answer
-- 409). purchase.fulfill is the payment backend's call, for the newest purchase that user
-- created in this run (read from the purchase.create answers), else a fresh one; with
-- neither left it sends purchase.get instead and counts a "fallback".

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local pattern = "LGLCLGFLGL"
local tag = "run"
local courses = {}
local next_course = 0
local payments_headers = nil
local headers = {}
local own = {}
local fresh = {}
local created = {}
local n = 0
rpc_errors = 0
http_errors = 0
exhausted = 0
fallbacks = 0

local function split(line)
  local fields = {}
  for field in line:gmatch("[^\t]+") do
    table.insert(fields, field)
  end
  return fields
end

function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  local fresh_index = 0
  local course_index = 0
  math.randomseed(1000 + tid)
  for line in io.lines(os.getenv("BENCH_PLAN")) do
    local f = split(line)
    local kind = f[1]
    if kind == "pattern" then
      pattern = f[2]
    elseif kind == "tag" then
      tag = f[2]
    elseif kind == "course" then
      if course_index % nthreads == tid then
        table.insert(courses, f[2])
      end
      course_index = course_index + 1
    elseif kind == "payments" then
      payments_headers = {
        ["Content-Type"] = "application/json",
        ["Authorization"] = f[2],
      }
    elseif kind == "user" then
      table.insert(headers, {
        ["Content-Type"] = "application/json",
        ["Authorization"] = f[2],
      })
      table.insert(own, {})
      table.insert(fresh, {})
      table.insert(created, {})
    elseif kind == "own" then
      table.insert(own[tonumber(f[2])], f[3])
    elseif kind == "fresh" then
      if fresh_index % nthreads == tid then
        table.insert(fresh[tonumber(f[2])], f[3])
      end
      fresh_index = fresh_index + 1
    end
  end
end

local function get_body(u)
  local ids = own[u]
  return string.format(
    '{"jsonrpc":"2.0","method":"purchase.get","params":{"purchase_id":"%s"},"id":"g%d"}',
    ids[math.random(#ids)], n)
end

function request()
  n = n + 1
  local position = ((n - 1) % #pattern) + 1
  local kind = pattern:sub(position, position)
  local u = math.random(#headers)
  local caller = headers[u]
  local body
  if kind == "L" then
    body = string.format(
      '{"jsonrpc":"2.0","method":"purchase.list","params":{"limit":20},"id":"l%d"}', n)
  elseif kind == "C" then
    next_course = next_course + 1
    if next_course > #courses then
      exhausted = exhausted + 1
    end
    body = string.format(
      '{"jsonrpc":"2.0","method":"purchase.create","params":{"course":"%s",'
        .. '"idempotency_key":"%s-%d-%d"},"id":"c%d-%d"}',
      courses[((next_course - 1) % #courses) + 1], tag, tid, n, u, n)
  elseif kind == "F" then
    local purchase_id = table.remove(created[u])
    if purchase_id == nil then
      purchase_id = table.remove(fresh[u])
    end
    if purchase_id == nil then
      fallbacks = fallbacks + 1
      body = get_body(u)
    else
      caller = payments_headers
      body = string.format(
        '{"jsonrpc":"2.0","method":"purchase.fulfill","params":{"purchase_id":"%s",'
          .. '"purchase_state":"fulfilled"},"id":"f%d"}',
        purchase_id, n)
    end
  else
    body = get_body(u)
  end
  return wrk.format("POST", nil, caller, body)
end

function response(status, headers_, body)
  if status ~= 200 and status ~= 204 then
    http_errors = http_errors + 1
  end
  if body == nil then
    return
  end
  if body:find('"error":{"code":', 1, true) then
    rpc_errors = rpc_errors + 1
    return
  end
  local u = body:match('"id":"c(%d+)%-')
  if u ~= nil then
    local purchase_id = body:match('"purchase_id":"(%x+)"')
    if purchase_id ~= nil then
      table.insert(created[tonumber(u)], purchase_id)
    end
  end
end

function done(summary, latency, _requests)
  local totals = { rpc_errors = 0, http_errors = 0, exhausted = 0, fallbacks = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (thread:get(name) or 0)
    end
  end
  local out = io.open(os.getenv("BENCH_RESULT"), "w")
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"socket_errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.1f, "stdev": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d}, '
      .. '"rpc_errors": %d, "http_errors": %d, "exhausted": %d, "fallbacks": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    totals.rpc_errors, totals.http_errors, totals.exhausted, totals.fallbacks))
  out:close()
end
