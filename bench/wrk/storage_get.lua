-- GET objects, round-robin over a list of paths (each thread starts at its own offset).
-- No response() callback: wrk would copy every body (1 MiB) into Lua. Non-2xx answers
-- (status >= 400, as wrk counts them) are reported as non2xx.
-- env: STB_PATHS (file, one path a line, with its query string: basalt paths, or SeaweedFS
--      presigned SigV4 URLs reduced to path?query), STB_HEADERS (optional file of
--      "Name: value" lines, e.g. the bearer token)
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
  i = (tid or 0) * 7
end

function request()
  i = i + 1
  return wrk.format("GET", paths[i % #paths + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "STBENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d socket_errors=%d bytes=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, summary.bytes))
end
