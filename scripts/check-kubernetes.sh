#!/usr/bin/env bash
# Checks deploy/kubernetes/: every manifest against the Kubernetes API
# schemas (kubernetes-validate, from PyPI, installed into a venv under
# target/ when missing; it ships the schemas, so this works offline once
# installed), and the config in the ConfigMap with `berth check`, with
# stand-ins for the Secrets' files at the paths the Deployment mounts them.
#
#   scripts/check-kubernetes.sh [BERTH]      # BERTH defaults to target/debug/berth
set -euo pipefail
cd "$(dirname "$0")/.."
BERTH=${1:-target/debug/berth}
# The Kubernetes version whose schemas the manifests must satisfy (the
# preStop `sleep` action needs 1.30 or later).
K8S_VERSION=${K8S_VERSION:-1.31}

VENV=target/k8s-venv
if ! "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1; then
    echo "==> installing kubernetes-validate into $VENV"
    python3 -m venv "$VENV" 2>/dev/null || {
        # Debian's python3 needs its venv package for this.
        if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv "$VENV"
    }
    "$VENV/bin/pip" install -q kubernetes-validate
fi

echo "==> kubernetes-validate (Kubernetes $K8S_VERSION, strict)"
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" deploy/kubernetes/*.yaml

echo "==> berth check on the ConfigMap's berth.toml"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/config" "$work/tls" "$work/secrets"
"$VENV/bin/python" - deploy/kubernetes/configmap.yaml "$work/config/berth.toml" <<'PY'
import sys, yaml
with open(sys.argv[1]) as f:
    doc = yaml.safe_load(f)
with open(sys.argv[2], "w") as out:
    out.write(doc["data"]["berth.toml"])
PY
# The Deployment mounts berth-tls at /etc/berth/tls and berth-secrets at
# /etc/berth/secrets, beside the config's directory.
cp certs/example.crt "$work/tls/tls.crt"
cp certs/example.key "$work/tls/tls.key"
head -c 48 /dev/urandom | base64 >"$work/secrets/cookie-secret"
head -c 80 /dev/urandom >"$work/secrets/ticket.keys"
"$BERTH" check "$work/config/berth.toml"
