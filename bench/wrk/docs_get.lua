-- GET one document by id, ids drawn at random from the seeded set.
-- env: DOCS_IDS (file, one id a line), DOCS_PREFIX (path before the id),
--      DOCS_HEADERS (optional file of "Name: value" lines)
local ids, prefix = {}, os.getenv("DOCS_PREFIX")

local function load_headers()
  local f = os.getenv("DOCS_HEADERS")
  if f and f ~= "" then
    for line in io.lines(f) do
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k then wrk.headers[k] = v end
    end
  end
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

function init(args)
  for line in io.lines(os.getenv("DOCS_IDS")) do
    if line ~= "" then ids[#ids + 1] = line end
  end
  load_headers()
  math.randomseed(os.time() * 1000 + (tid or 0))
end

function request()
  return wrk.format("GET", prefix .. ids[math.random(#ids)])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "DOCBENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d socket_errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout))
end
