#!/usr/bin/env bash
# Runs every test of esh3ar: unit, property, integration (real binary over
# real sockets), crash and damage tests. Needs only Rust (cargo) on Linux
# with io_uring (kernel 5.8+); installs what some tests need when it is
# missing: Python's aiosmtpd (a real SMTP server for the fallback tests),
# Node (apt-get) and the SignalR test client (npm ci), Prometheus' Python
# parser (prometheus_client), promtool (Debian `prometheus`) and Chromium.
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

# tests/fallback.rs runs a real SMTP server: Python 3 with aiosmtpd.
if ! command -v python3 >/dev/null; then
  echo "== installing python3 (tests/fallback.rs needs it)"
  apt-get update -q && apt-get install -y -q python3 python3-pip
fi
if ! python3 -c "import aiosmtpd" 2>/dev/null; then
  echo "== installing aiosmtpd (tests/fallback.rs runs it as a real SMTP server)"
  python3 -m pip install -q aiosmtpd || python3 -m pip install -q --break-system-packages aiosmtpd
fi

# The SignalR tests (tests/signalr.rs) drive the official @microsoft/signalr
# client in Node, pinned by tests/signalr/package-lock.json.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "== installing nodejs and npm (needed by tests/signalr.rs)"
  sudo_cmd=""
  if [ "$(id -u)" != "0" ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
if [ ! -d tests/signalr/node_modules/@microsoft/signalr ]; then
  echo "== npm ci (tests/signalr)"
  (cd tests/signalr && npm ci --no-audit --no-fund)
fi

# What the metrics, alert and dashboard tests drive (they fail, never skip,
# without it): Prometheus' Python parser, promtool, headless Chromium.
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
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
