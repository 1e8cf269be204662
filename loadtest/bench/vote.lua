-- wrk script of the bench: one distinct ballot per request, and a summary
-- line for the bench to read.
--
-- Arguments (after "--" on wrk's command line):
--   1  a tag of 8 hex digits, new for every wrk run, so that vote_ids never
--      repeat within a run (the edge answers a repeated vote_id 202 without
--      appending it)
--   2  the poll_id
--   3  the poll's option ids, comma-separated
--   4  optional: requests per second per thread, sent on a fixed schedule
--      (0 or absent: as fast as the connections allow)
--   5  optional: requests per thread, after which the thread stops, once
--      every one of them is answered (0 or absent: until wrk's -d ends);
--      it says so on stderr when it has sent them all and when it stops
--   6  optional: a path prefix; each thread writes the vote_id of every 202
--      to <prefix><thread number>, one per line ("-" or absent: none)
--   7  optional: "1" to send each voter from an address of its own, in
--      X-Forwarded-For (for an edge that trusts the bench as its proxy)
--   8  optional: a path prefix; each thread reads voter tokens, one per line,
--      from <prefix><thread number>, and sends each request with the next
--      one as "Authorization: Bearer" and no voter_fingerprint: the token
--      names the voter ("-" or absent: none)
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
local scheduled = 0 -- requests delay() has let go; request() follows each
local headers = { ["Content-Type"] = "application/json" }
local interval_ms, quota, forwarded = 0, 0, false
local tokens = nil
local ledger = nil
local next_at = nil
-- A paced request sent later than its slot by more than this counts as late:
-- the schedule was not held (the server or wrk fell behind).
local LATE_MS = 10
-- What a thread has done; the main state reads them in done().
accepted, shed, other, late, answered = 0, 0, 0, 0, 0

local now_ms = nil

local function monotonic_clock()
  -- wrk gives Lua no clock finer than os.time(); LuaJIT's FFI reaches
  -- clock_gettime(CLOCK_MONOTONIC) (Debian's wrk is built with LuaJIT).
  local ok, ffi = pcall(require, "ffi")
  if not ok then
    error("a paced rate needs wrk built with LuaJIT (its ffi module)")
  end
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } voteflow_timespec;
    int clock_gettime(int clock_id, voteflow_timespec *tp);
  ]])
  local ts = ffi.new("voteflow_timespec")
  return function()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
end

-- Runs in each thread's own Lua state.
function init(args)
  tag, poll_id = args[1], args[2]
  for id in string.gmatch(args[3], "[^,]+") do
    table.insert(options, id)
  end
  local rate = tonumber(args[4] or "0")
  quota = tonumber(args[5] or "0")
  local prefix = args[6] or "-"
  forwarded = args[7] == "1"
  if rate > 0 then
    interval_ms = 1000 / rate
    now_ms = monotonic_clock()
  end
  if prefix ~= "-" then
    ledger = assert(io.open(prefix .. thread_number, "w"))
  end
  local token_prefix = args[8] or "-"
  if token_prefix ~= "-" then
    tokens = {}
    for line in io.lines(token_prefix .. thread_number) do
      table.insert(tokens, line)
    end
  end
  -- wrk looks for delay() and response() after init: without pacing, a quota
  -- or a ledger, neither runs, and plain runs cost wrk nothing more.
  if interval_ms == 0 and quota == 0 then
    delay = nil
  end
  if quota == 0 and ledger == nil then
    response = nil
  end
end

function delay()
  -- Counted here, not in request(): several connections may be let go before
  -- the first of them calls request().
  if quota > 0 and scheduled >= quota then
    return 3600000 -- this thread's share is sent: the connection idles
  end
  scheduled = scheduled + 1
  if scheduled == quota then
    -- The bench gives the answers to the last requests a bounded time.
    io.stderr:write("BENCH-THREAD-SENT\n")
    io.stderr:flush()
  end
  if interval_ms == 0 then
    return 0
  end
  local now = now_ms()
  next_at = next_at or now
  local wait = next_at - now
  next_at = next_at + interval_ms
  if wait < 0 then
    if wait < -LATE_MS then
      late = late + 1
    end
    return 0
  end
  return wait
end

function request()
  counter = counter + 1
  if forwarded then
    local n = (thread_number * 1048576 + counter) % 16777216
    headers["X-Forwarded-For"] = string.format(
      "10.%d.%d.%d", math.floor(n / 65536), math.floor(n / 256) % 256, n % 256
    )
  end
  local body
  if tokens then
    headers["Authorization"] = "Bearer " .. tokens[(counter - 1) % #tokens + 1]
    body = string.format(
      '{"poll_id":"%s","option_ids":["%s"],"vote_id":"%s-%04x-4000-8000-%012x"}',
      poll_id, options[counter % #options + 1], tag, thread_number, counter
    )
  else
    body = string.format(
      '{"poll_id":"%s","option_ids":["%s"],"voter_fingerprint":"bench-%s-%d-%d",'
        .. '"vote_id":"%s-%04x-4000-8000-%012x"}',
      poll_id, options[counter % #options + 1], tag, thread_number, counter,
      tag, thread_number, counter
    )
  end
  return wrk.format("POST", "/api/vote", headers, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status == 202 then
    accepted = accepted + 1
    if ledger then
      ledger:write(string.match(body, '"vote_id":"([^"]+)"'), "\n")
    end
  elseif status == 503 then
    shed = shed + 1
  else
    other = other + 1
  end
  if quota > 0 and answered >= quota then
    if ledger then
      ledger:close()
      ledger = nil
    end
    -- The bench waits for one such line per thread, then stops wrk.
    io.stderr:write("BENCH-THREAD-DONE\n")
    io.stderr:flush()
    wrk.thread:stop()
  end
end

-- Runs in the main state after the run: one line of JSON for the bench.
-- Times are microseconds. errors.status counts responses with a status over
-- 399; the bench's servers answer a vote 202 or 4xx/5xx, nothing else.
-- accepted, shed and other are counted only when response() ran (-1 if not).
function done(summary, latency, requests)
  local e = summary.errors
  local counts = { accepted = 0, shed = 0, other = 0, late = 0, answered = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(counts) do
      counts[name] = counts[name] + (thread:get(name) or 0)
    end
  end
  local counted = counts.answered > 0 or summary.requests == 0
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"status":%d,"timeout":%d,"p50_us":%.1f,"p95_us":%.1f,"p99_us":%.1f,'
      .. '"max_us":%.1f,"accepted":%d,"shed":%d,"other":%d,"late":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max,
    counted and counts.accepted or -1, counted and counts.shed or -1,
    counted and counts.other or -1, counts.late
  ))
end
