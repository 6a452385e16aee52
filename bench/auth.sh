#!/usr/bin/env bash
# Auth benchmarks for issue 2: signup, password login and GET /v1/auth/user, each with
# `wrk -t2 -c16 -d10s --latency`, against a release build of basalt on SQLite and on
# PostgreSQL. Never run from tests or CI: numbers depend on the machine (bench/README.md).
#
# Usage: bench/auth.sh [sqlite|postgres|all]      (default: all)
# Environment:
#   BENCH_DURATION   wrk duration (default 10s)
#   BENCH_PG_URL     PostgreSQL server to create the throw-away database on
#                    (default postgres://postgres@127.0.0.1:5432)
#   BENCH_OUT        folder for raw wrk output and server logs (default: a new temp dir)
#   BENCH_ARGON2_MEMORY_KIB / BENCH_ARGON2_ITERATIONS  override the argon2id cost
#                    (default: basalt's own defaults, which the script does not set)
#   CARGO_TARGET_DIR respected when locating the binary.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
which_db=${1:-all}
duration=${BENCH_DURATION:-10s}
pg_base=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
out=${BENCH_OUT:-$(mktemp -d /tmp/basalt-bench.XXXXXX)}
mkdir -p "$out"
export BENCH_WRK_DIR="$repo/bench/wrk"
login_users=64

case "$which_db" in
sqlite | postgres | all) ;;
*)
    echo "usage: $0 [sqlite|postgres|all]" >&2
    exit 2
    ;;
esac

# --- tools -------------------------------------------------------------------------------
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
if [[ $which_db != sqlite ]]; then
    command -v psql >/dev/null || need_apt+=(postgresql-client)
fi
if ((${#need_apt[@]})); then
    echo "installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "building basalt (release)"
cargo build --release --quiet --bin basalt
bin="${CARGO_TARGET_DIR:-$repo/target}/release/basalt"
[[ -x $bin ]] || {
    echo "no binary at $bin" >&2
    exit 1
}
# a private copy: other builds sharing the target dir may replace the binary mid-run
cp "$bin" "$out/basalt"
bin="$out/basalt"

json_field() { # json_field FIELD.PATH < json
    python3 -c 'import json,sys
v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- server lifecycle --------------------------------------------------------------------
server_pid=""
pg_db=""

stop_server() {
    if [[ -n $server_pid ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        # wait for that PID (our child) to exit; SIGKILL if it outlives the grace period
        for _ in $(seq 1 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
    if [[ -n $pg_db ]]; then
        psql "$pg_base/postgres" -qAt -c "DROP DATABASE IF EXISTS $pg_db" >/dev/null || true
        pg_db=""
    fi
}
trap stop_server EXIT INT TERM

start_server() { # start_server sqlite|postgres
    local db=$1 data_dir
    data_dir=$(mktemp -d "$out/data-$db.XXXXXX")
    port=$(free_port)
    base="http://127.0.0.1:$port"
    local -a env=(
        BASALT_LISTEN="127.0.0.1:$port"
        BASALT_DATA_DIR="$data_dir"
        BASALT_RATE_LIMIT__ENABLED=false
        BASALT_LOG__LEVEL=warn
    )
    [[ -n ${BENCH_ARGON2_MEMORY_KIB:-} ]] && env+=(BASALT_AUTH__ARGON2_MEMORY_KIB="$BENCH_ARGON2_MEMORY_KIB")
    [[ -n ${BENCH_ARGON2_ITERATIONS:-} ]] && env+=(BASALT_AUTH__ARGON2_ITERATIONS="$BENCH_ARGON2_ITERATIONS")
    if [[ $db == postgres ]]; then
        pg_db="basalt_bench_$(date +%s)_$$"
        psql "$pg_base/postgres" -qAt -c "CREATE DATABASE $pg_db" >/dev/null
        env+=(BASALT_DATABASE__URL="$pg_base/$pg_db")
    fi
    env "${env[@]}" "$bin" serve >"$out/server-$db.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 150); do
        if curl -fsS "$base/ready" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "server did not become ready; log:" >&2
    cat "$out/server-$db.log" >&2
    exit 1
}

server_cpu_ticks() { # utime + stime of the server, in clock ticks
    awk '{print $14 + $15}' "/proc/$server_pid/stat"
}

clk_tck=$(getconf CLK_TCK)
results=()

# run_wrk NAME SCRIPT DB: runs wrk, keeps its output, records rps / p50 / p99 / server CPU
run_wrk() {
    local name=$1 script=$2 db=$3 file cpu0 cpu1 rps p50 p99 total cpu_us statuses rss load
    file="$out/$db-$name.txt"
    load=$(cut -d' ' -f1 /proc/loadavg)
    cpu0=$(server_cpu_ticks)
    wrk -t2 -c16 -d"$duration" --latency -s "$repo/bench/wrk/$script" "$base" >"$file"
    cpu1=$(server_cpu_ticks)
    rss=$(awk '/^VmHWM/ {printf "%d MiB", $2 / 1024}' "/proc/$server_pid/status")
    rps=$(awk '/^Requests\/sec:/ {printf "%d", $2}' "$file")
    p50=$(awk '$1 == "50%" {print $2}' "$file")
    p99=$(awk '$1 == "99%" {print $2}' "$file")
    total=$(awk '/requests in/ {print $1}' "$file")
    statuses=$(sed -n 's/^statuses: //p' "$file")
    cpu_us=$(awk -v t=$((cpu1 - cpu0)) -v hz="$clk_tck" -v n="$total" \
        'BEGIN { if (n > 0) printf "%d", t / hz * 1e6 / n; else print "-" }')
    printf '  %-8s %-7s %8s rps   p50 %-8s p99 %-8s server CPU/req %s µs  peak RSS %s  load before %s  [%s]\n' \
        "$db" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$rss" "$load" "$statuses"
    results+=("| $name | $db | $rps | $p50 | $p99 | $cpu_us | $rss | $load | $statuses |")
    if grep -q 'Non-2xx' "$file"; then
        echo "    warning: $(grep 'Non-2xx' "$file")" >&2
    fi
}

bench_one() { # bench_one sqlite|postgres
    local db=$1 run token i
    echo "== $db"
    start_server "$db"
    run="$(date +%s)$$"
    export BENCH_RUN=$run BENCH_USERS=$login_users

    # one sign-up and one login alone, to show the argon2id cost without contention
    local email="solo-$run@bench.example" t_signup t_login
    t_signup=$(curl -fsS -o /dev/null -w '%{time_total}' -H 'content-type: application/json' \
        -d "{\"email\":\"$email\",\"password\":\"correct horse battery\"}" "$base/v1/auth/signup")
    t_login=$(curl -fsS -o /dev/null -w '%{time_total}' -H 'content-type: application/json' \
        -d "{\"email\":\"$email\",\"password\":\"correct horse battery\"}" \
        "$base/v1/auth/token?grant_type=password")
    echo "  one signup alone: ${t_signup}s, one login alone: ${t_login}s"
    results+=("| (one request alone) | $db | signup ${t_signup}s, login ${t_login}s | | | | | | |")

    run_wrk signup signup.lua "$db"

    # users for the login benchmark, created 8 at a time
    # (waiting on these PIDs only: a bare `wait` would wait for the server too)
    local -a pids=()
    for ((i = 0; i < login_users; i++)); do
        curl -fsS -o /dev/null -H 'content-type: application/json' \
            -d "{\"email\":\"login-$run-$i@bench.example\",\"password\":\"correct horse battery\"}" \
            "$base/v1/auth/signup" &
        pids+=($!)
        if ((${#pids[@]} == 8)); then
            wait "${pids[@]}"
            pids=()
        fi
    done
    ((${#pids[@]} == 0)) || wait "${pids[@]}"
    run_wrk login login.lua "$db"

    token=$(curl -fsS -H 'content-type: application/json' \
        -d "{\"email\":\"login-$run-0@bench.example\",\"password\":\"correct horse battery\"}" \
        "$base/v1/auth/token?grant_type=password" | json_field session.access_token)
    BENCH_TOKEN=$token run_wrk user user.lua "$db"

    stop_server
}

echo "results and logs: $out"
echo "machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//')"
echo "argon2id: memory ${BENCH_ARGON2_MEMORY_KIB:-19456 (default)} KiB, iterations ${BENCH_ARGON2_ITERATIONS:-2 (default)}, parallelism 1"
[[ $which_db == sqlite || $which_db == all ]] && bench_one sqlite
[[ $which_db == postgres || $which_db == all ]] && bench_one postgres

{
    echo "| benchmark | database | rps | p50 | p99 | server CPU µs/req | server peak RSS | load avg before | statuses |"
    echo "|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${results[@]}"
} | tee "$out/summary.md"
