#!/usr/bin/env bash
# Memory before the handshake: what a connection that stops halfway through
# its TLS ClientHello or its first request head costs berth. Starts berth
# (release build, BERTH_WORKERS=1, handshake_timeout 60s so nothing is timed
# out during the run) with a ws and a wss listener, then for each case opens
# N such connections with `loadgen half-open`, measures berth's RSS growth
# while they are held, and prints one line per case (KiB per connection).
#
#   benches/half_open.sh                 # N=6000
#   N=2000 benches/half_open.sh
#   BERTH=/path/to/berth benches/half_open.sh   # another build of berth
#
# Each case runs against a fresh berth, so the figures do not carry over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

N=${N:-6000}

echo "==> half-open: building berth and the loadgen (release)" >&2
. benches/lib.sh
TMP=$(mktemp -d /tmp/berth-half-open.XXXXXX)
build_binaries "$TMP" "" --release || { echo "half-open: build failed" >&2; exit 1; }
# BERTH in the environment: measure that binary instead (e.g. an older build).
if [ -n "${BERTH:-}" ]; then cp "$BERTH" "$TMP/berth"; fi
BERTH=$TMP/berth
LOADGEN=$TMP/loadgen
BERTH_PID=""
stop_berth() {
    [ -n "$BERTH_PID" ] || return 0
    kill -TERM "$BERTH_PID" 2>/dev/null || true
    wait "$BERTH_PID" 2>/dev/null || true
    BERTH_PID=""
}
cleanup() {
    local rc=$?
    stop_berth
    if [ "$rc" -ne 0 ]; then
        echo "half-open: logs kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_WS P_WSS P_BACKEND <<<"$("$LOADGEN" free-ports --count 3)"
cat >"$TMP/berth.toml" <<EOF
[[listeners]]
name = "ws"
bind = "127.0.0.1:$P_WS"
handshake_timeout = "60s"

[[listeners]]
name = "wss"
bind = "127.0.0.1:$P_WSS"
handshake_timeout = "60s"
tls = { cert = "$PWD/certs/example.crt", key = "$PWD/certs/example.key" }

[[routes]]
pool = "echo"

[[pools.echo.backends]]
id = "echo-1"
address = "127.0.0.1:$P_BACKEND"
EOF

run_case() { # NAME URL STAGE
    BERTH_WORKERS=1 "$BERTH" --log-level warn run --config "$TMP/berth.toml" \
        >"$TMP/berth.out" 2>"$TMP/berth.err" &
    BERTH_PID=$!
    wait_port "$P_WS" "$BERTH_PID" && wait_port "$P_WSS" "$BERTH_PID" || {
        echo "half-open: berth did not start: $(cat "$TMP/berth.err")" >&2
        exit 1
    }
    sleep 1
    local json
    json=$("$LOADGEN" half-open --url "$2" --stage "$3" --connections "$N" \
        --watch-pid "$BERTH_PID" 2>>"$TMP/loadgen.err")
    stop_berth
    python3 - "$1" "$json" <<'PY'
import json, sys
name, j = sys.argv[1], json.loads(sys.argv[2])
print(f"{name:<28} {j['still_open']:>6} held   RSS +{j['rss_growth_kb']/1024:7.1f} MiB"
      f"   {j['bytes_per_connection']/1024:5.1f} KiB/connection")
PY
}

echo "berth: $BERTH; N=$N"
run_case "half a ClientHello (wss)" "wss://127.0.0.1:$P_WSS/" hello
run_case "half a request head (ws)" "ws://127.0.0.1:$P_WS/" head
run_case "half a request head (wss)" "wss://127.0.0.1:$P_WSS/" head
