#!/usr/bin/env bash
# Builds the local images the compose file uses by default:
#   twopc:local       the four twopc binaries, statically linked, FROM scratch
#   twopc-nats:local  nats-server, FROM scratch
# Image names can be overridden with TWOPC_IMAGE and NATS_IMAGE (then the
# nats image is not built: pull it, e.g. NATS_IMAGE=nats:2-alpine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
TWOPC_IMAGE="${TWOPC_IMAGE:-twopc:local}"
NATS_IMAGE="${NATS_IMAGE:-twopc-nats:local}"
target=x86_64-unknown-linux-gnu
echo "--- static build ($target, crt-static)" >&2
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --bins --target "$target" --target-dir target/static >&2
ctx="$root/target/compose-context"
rm -rf "$ctx" && mkdir -p "$ctx"
for b in twopc twopc-coordinator twopc-wallet twopc-order; do
  cp "target/static/$target/release/$b" "$ctx/"
done
docker build -q -t "$TWOPC_IMAGE" -f compose/Dockerfile "$ctx" >&2
if [[ "$NATS_IMAGE" == "twopc-nats:local" ]]; then
  nats_bin="$(./scripts/install-nats.sh)"
  cp "$nats_bin" "$ctx/nats-server"
  docker build -q -t "$NATS_IMAGE" -f compose/Dockerfile.nats "$ctx" >&2
fi
echo "built $TWOPC_IMAGE and $NATS_IMAGE" >&2
