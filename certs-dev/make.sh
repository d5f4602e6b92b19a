#!/usr/bin/env bash
# Regenerates the DEVELOPMENT-ONLY TLS material in this directory:
# a throwaway CA plus two leaf certificates signed by it.
# Never use any of this outside development and tests.
# Usage (from the repo root or anywhere): bash certs-dev/make.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

DAYS=3650
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# new_key FILE: ECDSA P-256 private key, PKCS#8 PEM.
new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -pkeyopt ec_param_enc:named_curve -out "$1"
}

# --- dev CA -----------------------------------------------------------------
new_key ca-key.pem
cat >"$work/ca.ext" <<'EXT'
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EXT
openssl req -new -sha256 -key ca-key.pem \
  -subj "/O=cutover DEV/CN=cutover DEV CA - do not trust" -out "$work/ca.csr"
openssl x509 -req -sha256 -days "$DAYS" -in "$work/ca.csr" \
  -signkey ca-key.pem -extfile "$work/ca.ext" -out ca.pem

# leaf NAME CN SAN: key NAME-key.pem, cert NAME.pem = leaf then CA (fullchain).
leaf() {
  local name=$1 cn=$2 san=$3
  new_key "$name-key.pem"
  cat >"$work/$name.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EXT
  openssl req -new -sha256 -key "$name-key.pem" \
    -subj "/O=cutover DEV/CN=$cn" -out "$work/$name.csr"
  openssl x509 -req -sha256 -days "$DAYS" -in "$work/$name.csr" \
    -CA ca.pem -CAkey ca-key.pem -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$work/$name.ext" -out "$work/$name.crt"
  cat "$work/$name.crt" ca.pem >"$name.pem"
}

# webpki (rustls) never matches "*.localhost": a wildcard needs at least two
# labels after it. So a few subdomains that tests may use are listed too.
LOCAL_SUBS="app api www admin blue green"
leaf localhost localhost "DNS:localhost, DNS:*.localhost, $(printf 'DNS:%s.localhost, ' $LOCAL_SUBS)IP:127.0.0.1, IP:::1"
leaf example example.test "DNS:example.test, DNS:*.example.test"

openssl verify -CAfile ca.pem localhost.pem example.pem
