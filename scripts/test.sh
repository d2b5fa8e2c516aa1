#!/usr/bin/env bash
# Runs every test: unit tests, golden bytes, and the end-to-end scenarios
# against a real nats-server and real service processes.
# Installs nats-server, Go (for the Go participant), headless Chromium (for the status page test) and
# openssl (the TLS tests make a test CA with scripts/make-ca.sh) if they are
# missing; builds the docker compose images and runs the compose
# tests (unless TWOPC_SKIP_DOCKER is set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(./scripts/install-nats.sh)"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"
CHROMIUM_BIN="$(./scripts/install-chromium.sh)"
export CHROMIUM_BIN
if ! command -v openssl >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    echo "installing openssl (Debian package)" >&2
    $SUDO apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >&2 || true
  fi
  command -v openssl >/dev/null 2>&1 ||
    echo "warning: no openssl: tests/tls.rs will say SKIPPED" >&2
fi
# The Go participant (go/shipping): installs Go and its Debian packages if
# missing, builds target/go/twopc-shipping (tests/go_participant.rs runs
# it) and runs the Go tests, golden vectors included.
./scripts/test-go.sh
export TWOPC_SHIPPING_BIN="$PWD/target/go/twopc-shipping"
cargo test --workspace --all-targets "$@"
# The SDK's tutorial is its rustdoc, compiled as doctests (--all-targets
# leaves doctests out).
cargo test --workspace --doc "$@"
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
