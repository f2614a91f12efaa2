-- wrk script for `make bench`: POST prebuilt JSON bodies, count what was not a success,
-- print one JSON line with the totals and latency percentiles.
--
--   wrk -t2 -c64 -d10s -s bench/wrk_post.lua http://127.0.0.1:8080 -- <path> <bodies file> <api key>
--
-- The bodies file holds one JSON body per line; each thread pre-formats every request once
-- (in init) and cycles through them, so the generator does no work per request beyond
-- wrk's own. A response counts as a success only when its status is 2xx and its body says
-- "success": true (a batch with rejected events is 200 but success false).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local prepared = {}
local index = 0
non2xx = 0
not_success = 0
first_bad = ""

function init(args)
  local path, bodies_file, key = args[1], args[2], args[3]
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
  for line in io.lines(bodies_file) do
    if #line > 0 then
      prepared[#prepared + 1] = wrk.format("POST", path, headers, line)
    end
  end
  index = (id * 9973) % #prepared  -- threads start at different bodies
end

function request()
  index = index % #prepared + 1
  return prepared[index]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_bad == "" then first_bad = status .. " " .. string.sub(body or "", 1, 200) end
  elseif not string.find(body, '"success"%s*:%s*true') then
    not_success = not_success + 1
    if first_bad == "" then first_bad = status .. " " .. string.sub(body or "", 1, 200) end
  end
end

local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end) .. '"'
end

function done(summary, latency, requests)
  local bad_status, bad_body, first = 0, 0, ""
  for _, thread in ipairs(threads) do
    bad_status = bad_status + thread:get("non2xx")
    bad_body = bad_body + thread:get("not_success")
    if first == "" then first = thread:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"not_success":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeout_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,"first_bad":%s}\n',
    summary.requests, summary.duration, summary.bytes, bad_status, bad_body,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    json_string(first)))
end
