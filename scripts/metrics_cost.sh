#!/usr/bin/env bash
# What a Prometheus scrape every second costs ingest: one release engine,
# the harness's closed-loop ingest scenario run ROUNDS times without and
# with a scraper (GET /metrics once a second), alternating, in the same run,
# so that drift on a shared machine hits both alike. Prints each run's
# throughput and the with/without ratio of the medians
# (docs/PERFORMANCE.md, "Metrics: what a scrape costs").
#
#   scripts/metrics_cost.sh                      # 3 rounds of 10 s
#   ROUNDS=5 DURATION=15s scripts/metrics_cost.sh
#   GEN_CPUS=4-7 GEN_THREADS=4 scripts/metrics_cost.sh   # pin the generator
#   ENGINE=... PERF=... scripts/metrics_cost.sh  # prebuilt binaries, no cargo
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-256}
SHARDS=${SHARDS:-2}
PORT_BASE=${PORT_BASE:-27400}
GEN_CPUS=${GEN_CPUS:-none}
GEN_THREADS=${GEN_THREADS:-1}
OUT=${OUT:-target/metrics-cost/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA_DIR=${DATA_DIR:-$OUT/data}

if [ -z "${ENGINE:-}" ] || [ -z "${PERF:-}" ]; then
  cargo build --release --locked -p esh3ar -p esh3ar-perf >&2
  ENGINE=target/release/esh3ar PERF=target/release/esh3ar-perf
fi
BUSINESS=$PORT_BASE MOBILE=$((PORT_BASE + 1)) ADMIN=$((PORT_BASE + 2))

cat >"$OUT/engine.toml" <<EOF
[engine]
shards = $SHARDS
data_dir = "$DATA_DIR"
memory_limit_bytes = 4294967296

[business]
listen = "127.0.0.1:$BUSINESS"

[mobile]
listen = "127.0.0.1:$MOBILE"
token_secret = "esh3ar-perf-secret-0123456789abcdef0123456789"

[admin]
listen = "127.0.0.1:$ADMIN"
token = "metrics-cost-admin-token"

[tiers.bench]
messages_per_minute = 1000000000

[[clients]]
id = "bench"
api_key = "esh3ar-perf-key-0123456789abcdef"
tier = "bench"
EOF

"$ENGINE" serve --config "$OUT/engine.toml" >"$OUT/engine.log" 2>&1 &
ENGINE_PID=$!
SCRAPER_PID=""
cleanup() {
  [ -n "$SCRAPER_PID" ] && kill "$SCRAPER_PID" 2>/dev/null || true
  kill "$ENGINE_PID" 2>/dev/null || true
  wait "$ENGINE_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$ADMIN" && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && grep -q ready <&3) 2>/dev/null && break
  sleep 0.1
done

scrape_every_second() { # counts scrapes and the bytes of each
  while true; do
    if exec 3<>"/dev/tcp/127.0.0.1/$ADMIN"; then
      printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
      wc -c <&3 >>"$OUT/scrapes.txt"
      exec 3<&-
    fi
    sleep 1
  done
}

field() { # field NAME FILE: the first number of "NAME": in a report
  grep -o "\"$1\": *[0-9.e+-]*" "$2" | head -n 1 | sed 's/.*: *//'
}
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

run() { # run NAME: one ingest report
  "$PERF" run --system esh3ar --addr "127.0.0.1:$BUSINESS" --mobile "127.0.0.1:$MOBILE" \
    --scenario ingest --connections "$CONNS" --duration "$DURATION" --warmup "$WARMUP" --cpus "$GEN_CPUS" --threads "$GEN_THREADS" \
    --out "$OUT/$1.json" >"$OUT/$1.log" 2>&1
  printf '%-12s %10.0f msg/s  accept p50 %s ms  p99 %s ms\n' "$1" "$(field throughput_per_s "$OUT/$1.json")" \
    "$(field p50_ms "$OUT/$1.json")" "$(field p99_ms "$OUT/$1.json")"
}

for i in $(seq 1 "$ROUNDS"); do
  run "without-$i"
  scrape_every_second &
  SCRAPER_PID=$!
  run "with-$i"
  kill "$SCRAPER_PID" 2>/dev/null || true
  wait "$SCRAPER_PID" 2>/dev/null || true
  SCRAPER_PID=""
done

without=$(for i in $(seq 1 "$ROUNDS"); do field throughput_per_s "$OUT/without-$i.json"; done | median)
with=$(for i in $(seq 1 "$ROUNDS"); do field throughput_per_s "$OUT/with-$i.json"; done | median)
echo "median without ${without} msg/s, with a scrape every second ${with} msg/s: ratio $(awk "BEGIN {printf \"%.3f\", $with / $without}")"
echo "$(wc -l <"$OUT/scrapes.txt") scrapes of $(sort -n "$OUT/scrapes.txt" | head -n 1)..$(sort -n "$OUT/scrapes.txt" | tail -n 1) bytes (HTTP head included)"
echo "reports in $OUT"
