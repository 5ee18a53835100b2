#!/usr/bin/env bash
# Regenerates the self-signed example certificate used by config/berth.toml:
# an ECDSA P-256 key (PKCS#8 PEM) and a certificate for localhost, 127.0.0.1
# and ::1, valid for ten years. The key is public (it is committed): use it
# for local testing only, never in a deployment.
#
# Usage: certs/regenerate.sh   (from anywhere; files land next to this script)
set -euo pipefail

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 3650 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$dir/example.key" -out "$dir/example.crt"

# A leaf certificate (CA:FALSE): clients trust it directly as its own anchor;
# webpki refuses a CA certificate used as a server certificate.
# openssl creates the key owner-only; this one is a public test fixture that
# tests and tools running as other users must be able to read.
chmod 644 "$dir/example.key"

echo "wrote $dir/example.crt and $dir/example.key"
