-- The same request again and again: a filtered list of 20 with the total count
-- (or the owner-rule query). env: DOCS_METHOD (GET|POST), DOCS_PATH, DOCS_BODY (POST only),
-- DOCS_HEADERS (optional file of "Name: value" lines)
function init(args)
  local f = os.getenv("DOCS_HEADERS")
  if f and f ~= "" then
    for line in io.lines(f) do
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k then wrk.headers[k] = v end
    end
  end
  local body = os.getenv("DOCS_BODY")
  if body == "" then body = nil end
  if body then wrk.headers["Content-Type"] = "application/json" end
  req = wrk.format(os.getenv("DOCS_METHOD") or "GET", os.getenv("DOCS_PATH"), nil, body)
end

function request()
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "DOCBENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d socket_errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout))
end
