#!/usr/bin/env bash
# Benchmark smoke test (CI): builds the load generator and berth (debug),
# starts the echo backend and berth (a tiny ws-only config in a temporary
# directory), and runs short throughput and latency runs directly against the
# backend and through berth. Fails (exit 1) on any verification error, lost
# message, connection error, or a run that echoed nothing.
#
#   benches/smoke.sh            # about 20 s on a warm build cache
#   SMOKE_DURATION=5 benches/smoke.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DURATION=${SMOKE_DURATION:-2}

echo "==> smoke: building berth and the loadgen (debug)"
. benches/lib.sh
TMP=$(mktemp -d /tmp/berth-smoke.XXXXXX)
build_binaries "$TMP" "" || { echo "smoke: build failed" >&2; exit 1; }
BERTH=$TMP/berth
LOADGEN=$TMP/loadgen
BACKEND_PID=""
BERTH_PID=""
stop_pid() {
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_pid "$BERTH_PID"
    stop_pid "$BACKEND_PID"
    if [ "$rc" -ne 0 ]; then
        echo "smoke: logs kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_BACKEND P_BERTH <<<"$("$LOADGEN" free-ports --count 2)"

"$LOADGEN" echo-backend --listen "127.0.0.1:$P_BACKEND" >"$TMP/backend.out" 2>"$TMP/backend.err" &
BACKEND_PID=$!
if ! wait_port "$P_BACKEND" "$BACKEND_PID"; then
    echo "smoke: the echo backend did not start: $(cat "$TMP/backend.err")" >&2
    exit 1
fi

cat >"$TMP/berth.toml" <<EOF
shutdown_window = "1s"

[[listeners]]
name = "ws"
bind = "127.0.0.1:$P_BERTH"

[[routes]]
path_prefix = "/"
pool = "echo"

[pools.echo]

[[pools.echo.backends]]
id = "echo-1"
address = "127.0.0.1:$P_BACKEND"
EOF
"$BERTH" run --config "$TMP/berth.toml" --log-level warn >"$TMP/berth.log" 2>&1 &
BERTH_PID=$!
if ! wait_port "$P_BERTH" "$BERTH_PID"; then
    echo "smoke: berth did not start:" >&2
    cat "$TMP/berth.log" >&2
    exit 1
fi

num() { # FILE KEY: a top-level number from the JSON output, or empty
    { grep -o "\"$2\":[0-9.]*" "$1" 2>/dev/null || true; } | head -n 1 | cut -d: -f2
}

failures=0
runs=0
check() { # NAME ARGS...: one loadgen run and its verdict
    local name=$1
    shift
    local out=$TMP/$name.json
    runs=$((runs + 1))
    if ! timeout 60 "$LOADGEN" "$@" >"$out" 2>"$TMP/$name.err"; then
        echo "FAIL $name: the loadgen failed: $(tail -n 3 "$TMP/$name.err")" >&2
        failures=$((failures + 1))
        return
    fi
    local messages verr conn lost
    messages=$(num "$out" messages)
    verr=$(num "$out" verification_errors)
    conn=$(num "$out" connection_errors)
    lost=$(num "$out" lost_messages)
    if [ -z "$messages" ] || [ "$messages" = 0 ] || [ "${verr:-x}" != 0 ] ||
        [ "${conn:-x}" != 0 ] || [ "${lost:-0}" != 0 ]; then
        echo "FAIL $name: messages=${messages:-?} verification_errors=${verr:-?} connection_errors=${conn:-?} lost=${lost:-0}" >&2
        cat "$out" >&2
        failures=$((failures + 1))
        return
    fi
    local rate
    rate=$(num "$out" msgs_per_sec)
    case $1 in
    latency) echo "ok   $name: $messages messages, p50 $(num "$out" p50_us) µs, p99 $(num "$out" p99_us) µs" ;;
    *) echo "ok   $name: $messages messages verified, ${rate%.*} msgs/s" ;;
    esac
}

for target in direct berth; do
    port=$P_BACKEND
    [ "$target" = berth ] && port=$P_BERTH
    url=ws://127.0.0.1:$port/
    check "$target-throughput-64B" throughput --url "$url" --connections 10 --window 8 --size 64 --duration "$DURATION"
    # 70,000 bytes takes the 64-bit length encoding through the relay.
    check "$target-throughput-70000B" throughput --url "$url" --connections 2 --window 2 --size 70000 --duration 1
    check "$target-latency" latency --url "$url" --connections 4 --duration "$DURATION"
done

if ! kill -0 "$BERTH_PID" 2>/dev/null; then
    echo "FAIL berth exited during the smoke test:" >&2
    cat "$TMP/berth.log" >&2
    failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
    echo "smoke: $failures of $runs runs FAILED" >&2
    exit 1
fi
echo "smoke: all $runs runs verified (direct and through berth)"
