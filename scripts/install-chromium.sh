#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium`) if missing; the status
# page test renders the coordinator's page in it. Prints the binary's path.
set -euo pipefail
for p in "${CHROMIUM_BIN:-}" /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
  if [[ -n "$p" && -x "$p" ]]; then echo "$p"; exit 0; fi
done
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  echo "installing chromium (Debian package)" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
  [[ -x /usr/bin/chromium ]] && { echo /usr/bin/chromium; exit 0; }
fi
echo "error: could not install chromium; set CHROMIUM_BIN" >&2
exit 1
