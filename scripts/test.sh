#!/usr/bin/env bash
# Runs every test: unit tests, golden bytes, and the end-to-end scenarios
# against a real nats-server and real service processes.
# Installs nats-server and headless Chromium (for the status page test) if
# they are missing; builds the docker compose images and runs the compose
# tests (unless TWOPC_SKIP_DOCKER is set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(./scripts/install-nats.sh)"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"
CHROMIUM_BIN="$(./scripts/install-chromium.sh)"
export CHROMIUM_BIN
cargo test --workspace --all-targets "$@"
# The compose tests (single node, and the three-node cluster) run the real
# images. They are #[ignore]d, so the command above does not run them; here
# they run explicitly, after building the images (set TWOPC_SKIP_DOCKER=1 on
# a machine without Docker).
if [[ -z "${TWOPC_SKIP_DOCKER:-}" ]]; then
  ./compose/build-images.sh
  cargo test --test compose -- --ignored
else
  echo "TWOPC_SKIP_DOCKER set: compose tests not run"
fi
