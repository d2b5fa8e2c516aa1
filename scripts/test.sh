#!/usr/bin/env bash
# Runs every test: unit tests, golden bytes, and the end-to-end scenarios
# against a real nats-server and real service processes.
# Installs nats-server and headless Chromium (for the status page test) if
# they are missing, and builds the docker compose images.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(./scripts/install-nats.sh)"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"
CHROMIUM_BIN="$(./scripts/install-chromium.sh)"
export CHROMIUM_BIN
# The compose test runs the real images (set TWOPC_SKIP_DOCKER=1 on a
# machine without Docker).
if [[ -z "${TWOPC_SKIP_DOCKER:-}" ]]; then
  ./compose/build-images.sh
fi
cargo test --workspace --all-targets "$@"
