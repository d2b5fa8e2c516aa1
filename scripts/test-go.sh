#!/usr/bin/env bash
# Builds and tests the Go participant (go/, see go/README.md).
#
# Installs Go 1.19 and the Debian packages of nats.go and go-sqlite3 if they
# are missing (the Go module proxy is not reachable here, so the build is in
# GOPATH mode over /usr/share/gocode), and nats-server through
# scripts/install-nats.sh. Builds target/go/twopc-shipping, checks gofmt and
# go vet, then runs the Go tests (extra arguments go to `go test`, e.g.
# -run Recovery -v). Exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

pkgs=(golang-go golang-github-nats-io-go-nats-dev golang-github-mattn-go-sqlite3-dev)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
elif ! command -v go >/dev/null 2>&1; then
  echo "error: no go, and no dpkg to install ${pkgs[*]}" >&2
  exit 1
fi
if ((${#missing[@]})); then
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  echo "installing ${missing[*]} (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; then
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

NATS_SERVER_BIN="$(./scripts/install-nats.sh)"
export NATS_SERVER_BIN

# GOPATH mode: our packages are twopc/protocol and twopc/shipping, through a
# link go/.gopath/src/twopc -> go/; the Debian packages come from
# /usr/share/gocode.
gopath="$root/go/.gopath"
mkdir -p "$gopath/src"
ln -sfn ../.. "$gopath/src/twopc"
export GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOFLAGS="" GOPROXY=off
packages=(twopc/protocol twopc/shipping)

mkdir -p target/go
go build -o target/go/twopc-shipping twopc/shipping
echo "built target/go/twopc-shipping ($(go version))"

unformatted="$(gofmt -l go/protocol go/shipping)"
if [[ -n "$unformatted" ]]; then
  echo "error: not gofmt-formatted: $unformatted" >&2
  exit 1
fi
go vet "${packages[@]}"
go test -count=1 "$@" "${packages[@]}"
