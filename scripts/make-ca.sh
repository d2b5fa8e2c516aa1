#!/usr/bin/env bash
# Makes a local certificate authority and the certificates twopc's TLS needs,
# in DIR (for tests and local use only: a throwaway CA whose key sits beside
# its certificate, short validity, no revocation):
#
#   ca.pem, ca-key.pem          the CA (clients and servers trust ca.pem)
#   server.pem, server-key.pem  nats-server: 127.0.0.1, ::1 and localhost, and
#                               the compose host names nats, n1, n2, n3; also
#                               usable as a client certificate (cluster routes
#                               present it to each other)
#   client.pem, client-key.pem  a client certificate for mutual TLS (every
#                               twopc service and the CLI may present it)
#
# Keys are written readable by their owner only (0600), the folder 0700.
# Idempotent: files that exist, are signed by ca.pem and stay valid for
# another day are kept; a missing or expiring CA is made again together with
# both certificates. Prints DIR.
#
#   usage: scripts/make-ca.sh DIR
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "error: openssl is required (Debian/Ubuntu: apt-get install openssl)" >&2
  exit 1
fi

dir="$1"
# Days a certificate is valid, and how long before its end it is remade.
days=30
renew_before_s=86400
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"

# A file that exists and stays valid past the renewal margin.
fresh() {
  [[ -s "$1" ]] && openssl x509 -in "$1" -noout -checkend "$renew_before_s" >/dev/null 2>&1
}

# An EC P-256 key (PKCS#8 PEM), 0600.
new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  chmod 600 "$1"
}

if ! fresh ca.pem || [[ ! -s ca-key.pem ]]; then
  echo "making a CA in $PWD" >&2
  new_key ca-key.pem
  openssl req -x509 -new -key ca-key.pem -sha256 -days "$days" \
    -subj "/O=twopc local test CA/CN=twopc local test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out ca.pem
  # Certificates of an earlier CA would not verify against this one.
  rm -f server.pem client.pem
fi

# leaf NAME CN SAN EKU: NAME.pem and NAME-key.pem signed by the CA, unless a
# fresh one signed by it is there.
leaf() {
  local name="$1" cn="$2" san="$3" eku="$4"
  if fresh "$name.pem" && [[ -s "$name-key.pem" ]] &&
    openssl verify -CAfile ca.pem "$name.pem" >/dev/null 2>&1; then
    return 0
  fi
  echo "making $name.pem ($cn) in $PWD" >&2
  new_key "$name-key.pem"
  local ext
  ext="$(mktemp)"
  cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$eku
subjectAltName=$san
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash
EOF
  openssl req -new -key "$name-key.pem" -subj "/O=twopc local test/CN=$cn" |
    openssl x509 -req -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 \
      -days "$days" -extfile "$ext" -out "$name.pem" 2>/dev/null
  rm -f "$ext"
}

leaf server "twopc nats-server" \
  "IP:127.0.0.1,IP:::1,DNS:localhost,DNS:nats,DNS:n1,DNS:n2,DNS:n3" \
  "serverAuth,clientAuth"
leaf client "twopc client" "DNS:twopc-client" "clientAuth"
rm -f ca.srl
chmod 600 ca-key.pem server-key.pem client-key.pem
chmod 644 ca.pem server.pem client.pem
echo "$PWD"
