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
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-256}
SHARDS=${SHARDS:-2}
PORT_BASE=${PORT_BASE:-27400}
OUT=${OUT:-target/metrics-cost/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

cargo build --release --locked -p esh3ar -p esh3ar-perf >&2
ENGINE=target/release/esh3ar
PERF=target/release/esh3ar-perf
BUSINESS=$PORT_BASE MOBILE=$((PORT_BASE + 1)) ADMIN=$((PORT_BASE + 2))

cat >"$OUT/engine.toml" <<EOF
[engine]
shards = $SHARDS
data_dir = "$PWD/$OUT/data"
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

run() { # run NAME: one ingest report
  "$PERF" run --system esh3ar --addr "127.0.0.1:$BUSINESS" --mobile "127.0.0.1:$MOBILE" \
    --scenario ingest --connections "$CONNS" --duration "$DURATION" --warmup "$WARMUP" --cpus none \
    --out "$OUT/$1.json" >"$OUT/$1.log" 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:<14} {r['throughput_per_s']:>10.0f} msg/s  p50 {r['acceptance']['p50_ms']:.2f} ms  p99 {r['acceptance']['p99_ms']:.2f} ms  errors {sum(r['errors'].values())}\")" "$OUT/$1.json" "$1"
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

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
tp = lambda k: [json.load(open(f"{out}/{k}-{i}.json"))["throughput_per_s"] for i in range(1, rounds + 1)]
without, with_ = tp("without"), tp("with")
sizes = [int(l) for l in open(f"{out}/scrapes.txt")]
print(f"median without {statistics.median(without):.0f} msg/s, with a scrape every second {statistics.median(with_):.0f} msg/s:"
      f" ratio {statistics.median(with_) / statistics.median(without):.3f}")
print(f"{len(sizes)} scrapes, {min(sizes)}..{max(sizes)} bytes each (HTTP head included)")
EOF
echo "reports in $OUT"
