-- wrk script: replay the requests of a plan file, cycling through them or using each once.
--
-- Environment (set by tests/benchmarks/loadgen.py):
--   BENCH_PLAN     the plan: first line "cycle" or "consume", then one request per line,
--                  "<Authorization header value, or ->" TAB "<JSON body>"
--   BENCH_THREADS  wrk's -t: thread i takes lines i, i+T, i+2T, ... of the plan
--   BENCH_RESULT   where done() writes the measurement as one JSON object
--
-- A "consume" plan (fresh purchases to fulfill) must not run out: requests past its end
-- start again from the top and are counted as "exhausted", which the harness reports.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local requests = {}
local position = 0
local consume = false
local served = 0
rpc_errors = 0
http_errors = 0
exhausted = 0

function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  local mode = nil
  local index = 0
  for line in io.lines(os.getenv("BENCH_PLAN")) do
    if mode == nil then
      mode = line
    else
      if index % nthreads == tid then
        local auth, body = line:match("^([^\t]*)\t(.*)$")
        local headers = { ["Content-Type"] = "application/json" }
        if auth ~= "-" then
          headers["Authorization"] = auth
        end
        table.insert(requests, wrk.format("POST", nil, headers, body))
      end
      index = index + 1
    end
  end
  consume = (mode == "consume")
end

function request()
  position = position + 1
  if position > #requests then
    position = 1
  end
  served = served + 1
  if consume and served > #requests then
    exhausted = exhausted + 1
  end
  return requests[position]
end

function response(status, headers, body)
  if status ~= 200 and status ~= 204 then
    http_errors = http_errors + 1
  end
  -- A JSON-RPC error object, in the project's answers and the baselines' alike.
  if body and body:find('"error":{"code":', 1, true) then
    rpc_errors = rpc_errors + 1
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
