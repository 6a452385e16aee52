-- PUT a body of STB_SIZE bytes per request, round-robin over a list of paths (each thread
-- starts at its own offset), so after the first pass every PUT replaces an existing object.
-- No response() callback: wrk would copy every body (1 MiB) into Lua. Non-2xx answers
-- (status >= 400, as wrk counts them) are reported as non2xx.
-- env: STB_PATHS (file, one path?query a line), STB_SIZE (bytes),
--      STB_HEADERS (optional file of "Name: value" lines)
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

function init(args)
  paths = {}
  for line in io.lines(os.getenv("STB_PATHS")) do
    if line ~= "" then paths[#paths + 1] = line end
  end
  local f = os.getenv("STB_HEADERS")
  if f and f ~= "" then
    for line in io.lines(f) do
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k then wrk.headers[k] = v end
    end
  end
  local size = tonumber(os.getenv("STB_SIZE"))
  -- not all one byte, so nothing on the way can shortcut it; the same body every request
  local chunk = string.rep("basalt-storage-bench-0123456789\n", 32)   -- 1 KiB
  body = string.rep(chunk, math.floor(size / #chunk)) .. string.rep("x", size % #chunk)
  wrk.headers["Content-Type"] = "application/octet-stream"
  i = (tid or 0) * 7919
end

function request()
  i = i + 1
  return wrk.format("PUT", paths[i % #paths + 1], nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "STBENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d socket_errors=%d bytes=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, summary.bytes))
end
