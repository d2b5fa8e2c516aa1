#!/usr/bin/env bash
# From a fresh clone: installs nats-server if missing, builds, and starts
# nats-server plus the coordinator, wallet and order services with demo
# users and products. Ctrl-C stops everything. Extra arguments go to
# `twopc up` (see `twopc up --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo (Rust) is required: https://rustup.rs" >&2
  exit 1
fi
NATS_SERVER_BIN="$(./scripts/install-nats.sh)"
export NATS_SERVER_BIN
cargo build --release --bins
exec target/release/twopc up "$@"
