#!/usr/bin/env bash
# The soak test (issue 12; not in CI): 9,000 WebSockets through berth, each
# sending a numbered message every second for 10 minutes, while berth is
# reloaded 20 times (10 unchanged, 10 with changed weights), one backend is
# drained through the admin API, and another is killed with SIGKILL and
# restarted. The loadgen's `soak` mode checks every echo and how every
# connection ended; this script sets the scene and plays the events.
#
#   benches/soak.sh                                         # the full soak (~12 min)
#   SOAK_CONNECTIONS=1000 SOAK_DURATION=60 benches/soak.sh  # a short validation run
#
# It passes (exit 0) when:
# - connections on the two untouched backends (and those that reach the
#   killed backend after its restart) lose, duplicate and reorder nothing
#   and stay open to the end;
# - every connection on the drained backend gets Close 1012 and every one on
#   the killed backend Close 1014;
# - nothing is duplicated, reordered or corrupted anywhere, and every
#   client is connected again at the end (clients reconnect after a close);
# - berth's open descriptors and RSS at the end (all clients connected) are
#   within SOAK_TOLERANCE per cent of their values at the start;
# - every reload and the drain answer 200, and berth is still running.
#
# Knobs (environment):
#   SOAK_CONNECTIONS  WebSockets held (default 9000; berth holds 2 descriptors
#                     each, so 9,000 stays under a 20,000 open-file limit)
#   SOAK_DURATION     seconds from "every client connected" to the end (default 600)
#   SOAK_INTERVAL     seconds between two messages of one connection (default 1)
#   SOAK_RELOADS      reloads, alternately unchanged and with changed weights (default 20)
#   SOAK_DRAIN_WINDOW the pool's drain_window (default: a tenth of the duration, at most 30s)
#   SOAK_RESTART_AFTER seconds the killed backend stays dead (default 5)
#   SOAK_TOLERANCE    allowed change of descriptors and RSS, per cent (default 5)
#   SOAK_THREADS      loadgen threads (default 1)
#   KEEP_WORK=1       keep the work directory (logs, config, JSON) even on success
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONNECTIONS=${SOAK_CONNECTIONS:-9000}
DURATION=${SOAK_DURATION:-600}
INTERVAL=${SOAK_INTERVAL:-1}
RELOADS=${SOAK_RELOADS:-20}
RESTART_AFTER=${SOAK_RESTART_AFTER:-5}
TOLERANCE=${SOAK_TOLERANCE:-5}
THREADS=${SOAK_THREADS:-1}
if [ -n "${SOAK_DRAIN_WINDOW:-}" ]; then
    DRAIN_WINDOW=$SOAK_DRAIN_WINDOW
else
    DRAIN_WINDOW="$((DURATION / 10 < 30 ? DURATION / 10 : 30))s"
fi
for tool in curl; do
    command -v "$tool" >/dev/null || { echo "soak: needs $tool" >&2; exit 1; }
done

echo "==> soak: building berth and the loadgen (release)"
. benches/lib.sh
WORK=$(mktemp -d /tmp/berth-soak.XXXXXX)
build_binaries "$WORK" "" --release || { echo "soak: build failed" >&2; exit 1; }
BERTH=$WORK/berth
LOADGEN=$WORK/loadgen
BERTH_PID=""
SOAK_PID=""
declare -A BACKEND_PID=()
stop_pid() {
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_pid "$SOAK_PID"
    stop_pid "$BERTH_PID"
    for id in "${!BACKEND_PID[@]}"; do stop_pid "${BACKEND_PID[$id]}"; done
    if [ "$rc" -ne 0 ] || [ -n "${KEEP_WORK:-}" ]; then
        echo "soak: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_B1 P_B2 P_B3 P_B4 P_BERTH P_ADMIN <<<"$("$LOADGEN" free-ports --count 6)"
declare -A PORT=([b1]=$P_B1 [b2]=$P_B2 [b3]=$P_B3 [b4]=$P_B4)
DRAINED=b1
KILLED=b2

start_backend() { # ID
    "$LOADGEN" echo-backend --listen "127.0.0.1:${PORT[$1]}" >>"$WORK/$1.out" 2>>"$WORK/$1.err" &
    BACKEND_PID[$1]=$!
    if ! wait_port "${PORT[$1]}" "${BACKEND_PID[$1]}"; then
        echo "soak: echo backend $1 did not start: $(cat "$WORK/$1.err")" >&2
        exit 1
    fi
}
for id in b1 b2 b3 b4; do start_backend "$id"; done

TOKEN=soak-admin-token
write_config() { # W1 W2 W3 W4
    cat >"$WORK/berth.toml.new" <<EOF
shutdown_window = "2s"

[[listeners]]
name = "ws"
bind = "127.0.0.1:$P_BERTH"

[admin]
bind = "127.0.0.1:$P_ADMIN"
token = "$TOKEN"

[[routes]]
path_prefix = "/"
pool = "soak"

[pools.soak]
balance = "least_connections"
affinity = "cookie"
drain_window = "$DRAIN_WINDOW"

[pools.soak.cookie]
name = "soak"
secret = "soak-test-cookie-secret-0123456789abcdef"

[pools.soak.health]
path = "/healthz"
interval = "1s"
timeout = "1s"
rise = 2
fall = 2

[[pools.soak.backends]]
id = "b1"
address = "127.0.0.1:$P_B1"
weight = $1

[[pools.soak.backends]]
id = "b2"
address = "127.0.0.1:$P_B2"
weight = $2

[[pools.soak.backends]]
id = "b3"
address = "127.0.0.1:$P_B3"
weight = $3

[[pools.soak.backends]]
id = "b4"
address = "127.0.0.1:$P_B4"
weight = $4
EOF
    mv "$WORK/berth.toml.new" "$WORK/berth.toml"
}
write_config 1 1 1 1
"$BERTH" check "$WORK/berth.toml" >/dev/null
"$BERTH" run --config "$WORK/berth.toml" --log-level warn >"$WORK/berth.log" 2>&1 &
BERTH_PID=$!
if ! wait_port "$P_BERTH" "$BERTH_PID" || ! wait_port "$P_ADMIN" "$BERTH_PID"; then
    echo "soak: berth did not start:" >&2
    cat "$WORK/berth.log" >&2
    exit 1
fi
echo "==> soak: berth pid $BERTH_PID, $CONNECTIONS connections, ${DURATION}s, drain_window $DRAIN_WINDOW; work directory $WORK"

"$LOADGEN" --threads "$THREADS" soak --url "ws://127.0.0.1:$P_BERTH/" \
    --connections "$CONNECTIONS" --duration "$DURATION" --interval "$INTERVAL" \
    --cookie soak --drained "$DRAINED" --killed "$KILLED" --berth-pid "$BERTH_PID" \
    --tolerance "$TOLERANCE" >"$WORK/soak.json" 2>"$WORK/soak.err" &
SOAK_PID=$!
for _ in $(seq 3000); do
    grep -q '^READY' "$WORK/soak.json" 2>/dev/null && break
    kill -0 "$SOAK_PID" 2>/dev/null || break
    sleep 0.1
done
if ! grep -q '^READY' "$WORK/soak.json"; then
    echo "soak: the clients did not connect:" >&2
    tail -n 20 "$WORK/soak.err" >&2
    exit 1
fi
T0=$(date +%s.%N)
echo "==> soak: $(grep '^READY' "$WORK/soak.json"); events follow"

failures=0
event_log=$WORK/events.log
calc() { awk "BEGIN { print $1 }"; }
note() { # MESSAGE
    printf '%7.1fs  %s\n' "$(calc "$(date +%s.%N) - $T0")" "$1" | tee -a "$event_log"
}
admin_post() { # PATH: prints the status code
    curl -s -o "$WORK/admin-answer" -w '%{http_code}' -X POST \
        -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$P_ADMIN$1" || echo 000
}

# The schedule: reloads spread evenly over the run, the drain at a quarter,
# the kill at half time and the restart RESTART_AFTER seconds later.
schedule=()
weights=("1 1 1 1" "3 1 2 1")
for k in $(seq "$RELOADS"); do
    schedule+=("$(calc "$DURATION * $k / ($RELOADS + 2)") reload $k")
done
schedule+=("$(calc "$DURATION / 4") drain $DRAINED")
schedule+=("$(calc "$DURATION / 2") kill $KILLED")
schedule+=("$(calc "$DURATION / 2 + $RESTART_AFTER") restart $KILLED")
mapfile -t schedule < <(printf '%s\n' "${schedule[@]}" | sort -n -k1,1)

weight_set=0
reloads_unchanged=0
reloads_changed=0
for entry in "${schedule[@]}"; do
    read -r at action arg <<<"$entry"
    wait_for=$(calc "$T0 + $at - $(date +%s.%N)")
    if [ "$(calc "($wait_for > 0) ? 1 : 0")" = 1 ]; then sleep "$wait_for"; fi
    case $action in
    reload)
        if [ $((arg % 2)) = 0 ]; then
            weight_set=$((1 - weight_set))
            # shellcheck disable=SC2086
            write_config ${weights[$weight_set]}
            what="weights ${weights[$weight_set]}"
            reloads_changed=$((reloads_changed + 1))
        else
            what="unchanged"
            reloads_unchanged=$((reloads_unchanged + 1))
        fi
        code=$(admin_post /admin/reload)
        note "reload $arg ($what): $code $(tr -d '\n' <"$WORK/admin-answer" | cut -c1-160)"
        [ "$code" = 200 ] || failures=$((failures + 1))
        ;;
    drain)
        code=$(admin_post "/admin/pools/soak/backends/$arg/drain")
        note "drain $arg: $code"
        [ "$code" = 200 ] || failures=$((failures + 1))
        ;;
    kill)
        kill -KILL "${BACKEND_PID[$arg]}"
        wait "${BACKEND_PID[$arg]}" 2>/dev/null || true
        note "SIGKILL $arg (pid ${BACKEND_PID[$arg]})"
        ;;
    restart)
        start_backend "$arg"
        note "restarted $arg (pid ${BACKEND_PID[$arg]})"
        ;;
    esac
done

echo "==> soak: events done; waiting for the clients to finish"
soak_rc=0
wait "$SOAK_PID" || soak_rc=$?
SOAK_PID=""
grep -v '^READY' "$WORK/soak.json" >"$WORK/report.json" || true
if command -v jq >/dev/null; then
    jq . "$WORK/report.json" || cat "$WORK/report.json"
else
    cat "$WORK/report.json"
fi
tail -n 3 "$WORK/soak.err"

if ! kill -0 "$BERTH_PID" 2>/dev/null; then
    echo "FAIL: berth exited during the soak" >&2
    failures=$((failures + 1))
fi
if grep -q panicked "$WORK/berth.log"; then
    echo "FAIL: berth logged a panic:" >&2
    grep -m 3 panicked "$WORK/berth.log" >&2
    failures=$((failures + 1))
fi
echo "reloads: $reloads_unchanged unchanged, $reloads_changed with changed weights (events: $event_log)"
if [ "$soak_rc" != 0 ]; then
    echo "FAIL: the soak criteria (see \"failures\" above)" >&2
    failures=$((failures + 1))
fi
if [ "$failures" != 0 ]; then
    echo "soak: FAILED ($failures)" >&2
    exit 1
fi
echo "soak: passed"
