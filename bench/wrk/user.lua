-- GET /v1/auth/user with one valid access token (BENCH_TOKEN): bearer verification (the
-- verified-token cache after the first request) plus one read of the user row.
package.path = package.path .. ";" .. (os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/?.lua"
require("common")

wrk.method = "GET"
wrk.path = "/v1/auth/user"
wrk.headers["Authorization"] = "Bearer " .. assert(os.getenv("BENCH_TOKEN"), "BENCH_TOKEN is not set")
