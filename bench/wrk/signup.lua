-- POST /v1/auth/signup, every request a new email: run id (BENCH_RUN) + thread id + a
-- per-thread counter. Measures argon2id hashing + user and session inserts + token signing.
package.path = package.path .. ";" .. (os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/?.lua"
require("common")

local run = os.getenv("BENCH_RUN") or tostring(os.time())
local counter = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local body = string.format(
    '{"email":"signup-%s-%d-%d@bench.example","password":"correct horse battery"}',
    run, thread_id, counter)
  return wrk.format(nil, "/v1/auth/signup", nil, body)
end
