#!/usr/bin/env bash
# Runs every test of esh3ar: unit, property, integration (real binary over
# real sockets), crash and damage tests. Needs only Rust (cargo) on Linux
# with io_uring (kernel 5.8+). Installs what the metrics, alert and
# dashboard tests need when missing (python3 + prometheus_client, promtool,
# chromium; apt-get on Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust from https://rustup.rs" >&2
  exit 1
fi

# glommio pins one executor per CPU and locks a little memory for io_uring.
memlock=$(ulimit -l)
if [ "$memlock" != "unlimited" ] && [ "$memlock" -lt 512 ]; then
  echo "warning: 'ulimit -l' is ${memlock} KiB; io_uring may need more (try: ulimit -l 8192)" >&2
fi

# What the metrics, alert and dashboard tests drive (they fail, never skip,
# without it): Prometheus' Python parser, promtool, headless Chromium.
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}
if ! command -v python3 >/dev/null; then
  echo "== installing python3 (tests/metrics.rs parses /metrics with prometheus_client)"
  apt_install python3
fi
if ! python3 -c "import prometheus_client" 2>/dev/null; then
  echo "== installing prometheus_client (tests/metrics.rs)"
  python3 -m pip install --quiet prometheus_client 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages prometheus_client 2>/dev/null \
    || apt_install python3-prometheus-client
fi
if ! command -v promtool >/dev/null; then
  echo "== installing prometheus (promtool, for tests/alerts.rs)"
  apt_install prometheus
fi
if ! command -v chromium >/dev/null && [ -z "${ESH3AR_CHROMIUM:-}" ]; then
  echo "== installing chromium (tests/dashboard.rs)"
  apt_install chromium
fi

echo "== cargo test (workspace)"
cargo test --workspace --locked "$@"
