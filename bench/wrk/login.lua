-- POST /v1/auth/token?grant_type=password over BENCH_USERS pre-created users
-- (login-<BENCH_RUN>-<i>@bench.example, i in 0..BENCH_USERS-1), taken round-robin from a
-- per-thread offset. Measures argon2id verification + user update + session insert + signing.
package.path = package.path .. ";" .. (os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/?.lua"
require("common")

local run = os.getenv("BENCH_RUN") or "0"
local users = tonumber(os.getenv("BENCH_USERS") or "64")
local counter = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local i = (thread_id * 7919 + counter) % users
  local body = string.format(
    '{"email":"login-%s-%d@bench.example","password":"correct horse battery"}', run, i)
  return wrk.format(nil, "/v1/auth/token?grant_type=password", nil, body)
end
