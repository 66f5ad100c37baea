#!/usr/bin/env bash
# Runs every test of esh3ar: unit, property, integration (real binary over
# real sockets), crash and damage tests. Needs only Rust (cargo) on Linux
# with io_uring (kernel 5.8+); nothing else to install or start.
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

echo "== cargo test (workspace)"
cargo test --workspace --locked "$@"
