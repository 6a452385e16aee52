-- Create a 3-field record {title, n, tag} per request.
-- env: DOCS_PATH, DOCS_WRAP ("data" wraps the record as {"data": {...}}, basalt's shape),
--      DOCS_HEADERS (optional file of "Name: value" lines)
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

function init(args)
  local f = os.getenv("DOCS_HEADERS")
  if f and f ~= "" then
    for line in io.lines(f) do
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k then wrk.headers[k] = v end
    end
  end
  wrk.method = "POST"
  wrk.path = os.getenv("DOCS_PATH")
  wrk.headers["Content-Type"] = "application/json"
  wrap = os.getenv("DOCS_WRAP") or ""
  seq = 0
  math.randomseed(os.time() * 1000 + (tid or 0))
end

local tags = {"a", "b", "c"}
function request()
  seq = seq + 1
  local n = math.random(0, 999)
  local rec = string.format('{"title":"bench %d-%d","n":%d,"tag":"%s"}',
                            tid or 0, seq, n, tags[n % 3 + 1])
  if wrap ~= "" then rec = string.format('{"%s":%s}', wrap, rec) end
  return wrk.format(nil, nil, nil, rec)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "DOCBENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d socket_errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout))
end
