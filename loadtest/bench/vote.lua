-- wrk script of the bench: one distinct ballot per request, and a summary
-- line for the bench to read.
--
-- Arguments (after "--" on wrk's command line):
--   1  a tag of 8 hex digits, new for every wrk run, so that vote_ids never
--      repeat within a run (the edge answers a repeated vote_id 202 without
--      appending it)
--   2  the poll_id
--   3  the poll's option ids, comma-separated
--
-- Every request is a new voter with a new vote_id:
--   vote_id  <tag>-<thread:4 hex>-4000-8000-<counter:12 hex>
--   voter    bench-<tag>-<thread>-<counter>
-- and names one option, in turn.

local threads = {}

-- Runs in wrk's main Lua state, once per thread, before init.
function setup(thread)
  thread:set("thread_number", #threads)
  table.insert(threads, thread)
end

local tag, poll_id = "00000000", "00000000-0000-4000-8000-000000000000"
local options = {}
local counter = 0
local headers = { ["Content-Type"] = "application/json" }

-- Runs in each thread's own Lua state.
function init(args)
  tag, poll_id = args[1], args[2]
  for id in string.gmatch(args[3], "[^,]+") do
    table.insert(options, id)
  end
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"poll_id":"%s","option_ids":["%s"],"voter_fingerprint":"bench-%s-%d-%d",'
      .. '"vote_id":"%s-%04x-4000-8000-%012x"}',
    poll_id, options[counter % #options + 1], tag, thread_number, counter,
    tag, thread_number, counter
  )
  return wrk.format("POST", "/api/vote", headers, body)
end

-- Runs in the main state after the run: one line of JSON for the bench.
-- Times are microseconds. errors.status counts responses with a status over
-- 399; the bench's servers answer a vote 202 or 4xx/5xx, nothing else.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"status":%d,"timeout":%d,"p50_us":%.1f,"p95_us":%.1f,"p99_us":%.1f,'
      .. '"max_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max
  ))
end
