#!/usr/bin/env bash
# A fleet of berth processes sharing one port with reuse_port, holding
# CONNECTIONS idle wss connections; reports the total RSS of the berth
# processes (issue 14's "at scale" figure; not run in CI).
#
#   benches/fleet.sh                                   # 100,000 connections, 12 berths
#   CONNECTIONS=6000 BERTHS=3 LOADGENS=2 BACKENDS=2 benches/fleet.sh   # a trial
#
# Every process stays under this machine's open-file limit (20,000): berth
# holds two descriptors per connection (client and backend), so each berth
# takes at most ~9,700 (its descriptor reserve refuses beyond), hence
# BERTHS >= CONNECTIONS / 9,000 with the kernel's uneven spread. Load
# generators and echo backends are spread over processes too, and the
# clients over source addresses 127.0.0.2-127.0.0.250 (the loadgen's idle
# default), so no address pair runs out of ports. The berths share
# 127.0.0.1:$PORT (SO_REUSEPORT: the kernel picks a process per
# connection by a hash of its addresses); each has its own admin port.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-100000}
BERTHS=${BERTHS:-12}
LOADGENS=${LOADGENS:-8}
BACKENDS=${BACKENDS:-8}
HOLD=${HOLD:-120}
CONCURRENCY=${CONCURRENCY:-64}
OUT=${OUT:-}

log() { printf '[fleet %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

WORK=$(mktemp -d /tmp/berth-fleet.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

log "building berth and the loadgen (release)"
. benches/lib.sh
build_binaries "$WORK" "" --release || die "build failed"
BERTH=$WORK/berth
LOADGEN=$WORK/loadgen

# One call, so the ports differ from each other.
# shellcheck disable=SC2207
PORTS=($("$LOADGEN" free-ports --count $((1 + BERTHS + BACKENDS))))
PORT=${PORTS[0]}
ADMIN_PORTS=("${PORTS[@]:1:$BERTHS}")
BACKEND_PORTS=("${PORTS[@]:$((1 + BERTHS)):$BACKENDS}")

log "starting $BACKENDS echo backends"
for ((i = 0; i < BACKENDS; i++)); do
    "$LOADGEN" echo-backend --listen "127.0.0.1:${BACKEND_PORTS[$i]}" >"$WORK/backend$i.log" 2>&1 &
    PIDS+=($!)
done

backends=""
for ((i = 0; i < BACKENDS; i++)); do
    backends+=$'\n'"[[pools.echo.backends]]"$'\n'"id = \"e$i\""$'\n'"address = \"127.0.0.1:${BACKEND_PORTS[$i]}\""$'\n'
done

log "starting $BERTHS berth processes sharing 127.0.0.1:$PORT (reuse_port)"
BERTH_PIDS=()
for ((i = 0; i < BERTHS; i++)); do
    cat >"$WORK/berth$i.toml" <<EOF
shutdown_window = "0s"

[[listeners]]
name = "wss"
bind = "127.0.0.1:$PORT"
reuse_port = true
tls = { cert = "$PWD/certs/example.crt", key = "$PWD/certs/example.key" }

[admin]
bind = "127.0.0.1:${ADMIN_PORTS[$i]}"

[[routes]]
pool = "echo"

[pools.echo]
connect_timeout = "10s"
$backends
EOF
    BERTH_WORKERS=1 "$BERTH" run "$WORK/berth$i.toml" >"$WORK/berth$i.log" 2>&1 &
    BERTH_PIDS+=($!)
    PIDS+=($!)
done
for ((i = 0; i < BERTHS; i++)); do
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:${ADMIN_PORTS[$i]}/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fs "http://127.0.0.1:${ADMIN_PORTS[$i]}/readyz" >/dev/null || die "berth $i did not start"
done

rss_kib() { # PIDS...: total VmRSS in KiB
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")))
    done
    echo "$total"
}
rss_start=$(rss_kib "${BERTH_PIDS[@]}")

per=$((CONNECTIONS / LOADGENS))
log "opening $CONNECTIONS idle wss connections from $LOADGENS load generators"
LG_PIDS=()
t0=$(date +%s.%N)
for ((i = 0; i < LOADGENS; i++)); do
    n=$per
    [ "$i" -eq $((LOADGENS - 1)) ] && n=$((CONNECTIONS - per * (LOADGENS - 1)))
    # Each load generator its own slice of source addresses.
    lo=$((2 + i * 248 / LOADGENS)); hi=$((1 + (i + 1) * 248 / LOADGENS))
    "$LOADGEN" idle --url "wss://127.0.0.1:$PORT/" --ca certs/example.crt \
        --source-ips "127.0.0.$lo-127.0.0.$hi" --connections "$n" \
        --concurrency "$CONCURRENCY" --hold "$HOLD" >"$WORK/lg$i.out" 2>"$WORK/lg$i.err" &
    LG_PIDS+=($!)
    PIDS+=($!)
done
ready=0
while [ "$ready" -lt "$LOADGENS" ]; do
    ready=0
    for ((i = 0; i < LOADGENS; i++)); do
        grep -q '^READY' "$WORK/lg$i.out" 2>/dev/null && ready=$((ready + 1))
        kill -0 "${LG_PIDS[$i]}" 2>/dev/null || grep -q '^READY' "$WORK/lg$i.out" ||
            die "load generator $i ended early: $(tail -n 3 "$WORK/lg$i.err")"
    done
    sleep 0.5
done
t1=$(date +%s.%N)
opened=$(cat "$WORK"/lg*.out | awk '/^READY/ {s += $2} END {print s}')
sleep 2
rss_held=$(rss_kib "${BERTH_PIDS[@]}")
live=0
per_berth=()
fds=()
for ((i = 0; i < BERTHS; i++)); do
    n=$(curl -fs "http://127.0.0.1:${ADMIN_PORTS[$i]}/metrics" |
        awk '/^berth_websocket_connections_active/ {s += $2} END {print s + 0}')
    live=$((live + n))
    per_berth+=("$n")
    fds+=("$(ls "/proc/${BERTH_PIDS[$i]}/fd" | wc -l)")
done
refused=0
for ((i = 0; i < BERTHS; i++)); do
    r=$(curl -fs "http://127.0.0.1:${ADMIN_PORTS[$i]}/metrics" |
        awk '/^berth_connections_refused_total/ {s += $2} END {print s + 0}')
    refused=$((refused + r))
done
log "waiting for the load generators to check every connection still echoes"
failed=0
for ((i = 0; i < LOADGENS; i++)); do wait "${LG_PIDS[$i]}" || failed=$((failed + 1)); done

report=$(cat <<EOF
berth fleet, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), $(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB
berth processes: $BERTHS sharing 127.0.0.1:$PORT (reuse_port, BERTH_WORKERS=1, open-file limit $(ulimit -n))
load generators: $LOADGENS; echo backends: $BACKENDS
connections opened (READY): $opened of $CONNECTIONS in $(echo "$t1 - $t0" | bc) s
live WebSockets (sum of berth_websocket_connections_active): $live
per berth: ${per_berth[*]}
descriptors per berth: ${fds[*]}
refused (berth_connections_refused_total, all reasons): $refused
total RSS of the berth processes: $((rss_start / 1024)) MiB before, $((rss_held / 1024)) MiB holding (growth $(((rss_held - rss_start) * 1024 / (live > 0 ? live : 1))) bytes per connection)
load generators that failed their echo check: $failed
EOF
)
echo "$report"
[ -z "$OUT" ] || echo "$report" >"$OUT"
