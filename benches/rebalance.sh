#!/usr/bin/env bash
# The rebalance at scale (issue 14; not run in CI): tests/rebalance.rs at
# 9,000 connections. Three echo backends hold 3,000 WebSockets each through
# one berth (least connections, [pools.NAME.rebalance] threshold = 1.2); a
# fourth backend is added to the config file and berth gets SIGHUP. The
# script samples berth's /metrics every SAMPLE seconds through the window,
# close_timeout and a margin, and reports the per-backend counts before and
# after, the highest any backend reached, the rebalance's closes per tenth
# of the window, and the soak clients' own account (every echo checked; how
# many times each client was closed).
#
#   benches/rebalance.sh                      # 9,000 connections, a 20 s window
#   CONNECTIONS=900 WINDOW=10 benches/rebalance.sh   # a short trial
#
# Descriptors: the whole scenario in one process would need ~36,000 (the
# clients' 9,000, berth's 18,000, the backends' 9,000), over this machine's
# 20,000 open-file limit, so every part is its own process: berth (two per
# connection: 18,000 plus its listeners), each echo backend (one per
# connection), and LOADGENS soak processes (CONNECTIONS / LOADGENS each),
# whose clients bind source addresses 127.0.0.2-127.0.0.250 (each load
# generator its own slice) so no address pair runs out of ports.
#
# Knobs (environment):
#   CONNECTIONS    WebSockets (default 9000; a multiple of 3 settles evenly)
#   LOADGENS       soak processes (default 2)
#   WINDOW         the rebalance window in seconds (default 20)
#   CLOSE_TIMEOUT  the pool's close_timeout in seconds (default 3)
#   THRESHOLD      the rebalance threshold (default 1.2)
#   SAMPLE         seconds between two /metrics samples (default 0.15)
#   MARGIN         seconds sampled after window + close_timeout (default 5)
#   INTERVAL       seconds between two messages of one client (default 1)
#   CONCURRENCY    connects in progress at once per soak process (default 1,
#                  as tests/rebalance.rs connects). berth counts a WebSocket
#                  for least connections only once the backend's 101 is back,
#                  so upgrades in flight together pick from the same counts:
#                  at 900 with 128 (the soak mode's default; 450 connects per
#                  process in 0.2 s) the three backends started uneven (b1
#                  held 379 of 900 in one run; 342, 256, 302 in another), and the
#                  rebalance, which sheds only backends above the threshold,
#                  left them outside ±10 %. At 9,000 with 128 they started at
#                  3,003, 2,994 and 3,003.
#   BERTH_WORKERS  berth's worker threads (default 1)
#   OUT            also write the report (markdown) to this file
#   KEEP_WORK=1    keep the work directory (logs, config, samples, JSON)
#
# Exit status 1 when the scenario could not run (a process did not start,
# the clients did not connect, the reload failed); the figures themselves
# are reported, with a verdict line, and judged by the reader.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONNECTIONS=${CONNECTIONS:-9000}
LOADGENS=${LOADGENS:-2}
WINDOW=${WINDOW:-20}
CLOSE_TIMEOUT=${CLOSE_TIMEOUT:-3}
THRESHOLD=${THRESHOLD:-1.2}
SAMPLE=${SAMPLE:-0.15}
MARGIN=${MARGIN:-5}
INTERVAL=${INTERVAL:-1}
CONCURRENCY=${CONCURRENCY:-1}
OUT=${OUT:-}
export BERTH_WORKERS=${BERTH_WORKERS:-1}
SETTLE=5 # seconds after READY before the reload (counts settle)

log() { printf '[rebalance %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in curl jq awk; do
    command -v "$tool" >/dev/null || die "needs $tool"
done
# Every process started here inherits the hard open-file limit.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((2 * CONNECTIONS + 500)) ] ||
    die "berth needs $((2 * CONNECTIONS + 500)) descriptors; the open-file limit is $(ulimit -n)"

log "building berth and the loadgen (release)"
. benches/lib.sh
WORK=$(mktemp -d /tmp/berth-rebalance.XXXXXX)
build_binaries "$WORK" "" --release || die "build failed"
BERTH=$WORK/berth
LOADGEN=$WORK/loadgen
PIDS=()
cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ] || [ -n "${KEEP_WORK:-}" ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_B1 P_B2 P_B3 P_B4 P_BERTH P_ADMIN <<<"$("$LOADGEN" free-ports --count 6)"
BACKEND_PORTS=("$P_B1" "$P_B2" "$P_B3" "$P_B4")
for i in 0 1 2 3; do
    "$LOADGEN" echo-backend --listen "127.0.0.1:${BACKEND_PORTS[$i]}" \
        >"$WORK/b$((i + 1)).out" 2>"$WORK/b$((i + 1)).err" &
    PIDS+=($!)
    wait_port "${BACKEND_PORTS[$i]}" $! || die "echo backend b$((i + 1)) did not start"
done

write_config() { # NUMBER_OF_BACKENDS
    {
        cat <<EOF
shutdown_window = "1s"

[[listeners]]
name = "ws"
bind = "127.0.0.1:$P_BERTH"

[admin]
bind = "127.0.0.1:$P_ADMIN"

[[routes]]
pool = "rb"

[pools.rb]
balance = "least_connections"
close_timeout = "${CLOSE_TIMEOUT}s"

[pools.rb.rebalance]
threshold = $THRESHOLD
window = "${WINDOW}s"
EOF
        for ((i = 0; i < $1; i++)); do
            printf '\n[[pools.rb.backends]]\nid = "b%d"\naddress = "127.0.0.1:%s"\n' \
                $((i + 1)) "${BACKEND_PORTS[$i]}"
        done
    } >"$WORK/berth.toml.new"
    "$BERTH" check "$WORK/berth.toml.new" >/dev/null
    mv "$WORK/berth.toml.new" "$WORK/berth.toml"
}
write_config 3
"$BERTH" run --config "$WORK/berth.toml" --log-level info >"$WORK/berth.log" 2>&1 &
BERTH_PID=$!
PIDS+=("$BERTH_PID")
if ! wait_port "$P_BERTH" "$BERTH_PID" || ! wait_port "$P_ADMIN" "$BERTH_PID"; then
    die "berth did not start: $(tail -n 5 "$WORK/berth.log")"
fi

metrics() { curl -fs --max-time 2 "http://127.0.0.1:$P_ADMIN/metrics"; }
# One line from a /metrics text: live WebSockets of b1..b4, the rebalance
# closes of b1..b4, and the successful reloads.
summarize() {
    awk '
        function backend(line) { match(line, /backend="[^"]*"/); return substr(line, RSTART + 9, RLENGTH - 10) }
        /^berth_websocket_connections_active\{/ && /pool="rb"/ { a[backend($0)] = $NF }
        /^berth_websocket_rebalanced_total\{/ && /pool="rb"/ { r[backend($0)] = $NF }
        /^berth_config_reloads_total\{/ && /result="success"/ { ok = $NF }
        END {
            printf "%d %d %d %d %d %d %d %d %d\n", a["b1"], a["b2"], a["b3"], a["b4"],
                r["b1"], r["b2"], r["b3"], r["b4"], ok
        }'
}

# The soak clients: they run SETTLE + the sampled span + a little, then
# stop (after every client is connected again), checking every echo.
SPAN=$(awk -v w="$WINDOW" -v c="$CLOSE_TIMEOUT" -v m="$MARGIN" 'BEGIN { print w + c + m }')
# Each soak process counts its duration from its own READY: SLACK covers
# the time between the first and the last READY.
SLACK=60
DURATION=$(awk -v s="$SPAN" -v t="$SETTLE" -v k="$SLACK" 'BEGIN { print s + t + 5 + k }')
log "berth pid $BERTH_PID; $CONNECTIONS soak clients from $LOADGENS processes; window ${WINDOW}s, close_timeout ${CLOSE_TIMEOUT}s; work directory $WORK"
LG_PIDS=()
per=$((CONNECTIONS / LOADGENS))
for ((i = 0; i < LOADGENS; i++)); do
    n=$per
    [ "$i" -eq $((LOADGENS - 1)) ] && n=$((CONNECTIONS - per * (LOADGENS - 1)))
    lo=$((2 + i * 249 / LOADGENS)); hi=$((1 + (i + 1) * 249 / LOADGENS))
    "$LOADGEN" soak --url "ws://127.0.0.1:$P_BERTH/" --cookie unused \
        --source-ips "127.0.0.$lo-127.0.0.$hi" --connections "$n" \
        --duration "$DURATION" --interval "$INTERVAL" --concurrency "$CONCURRENCY" \
        >"$WORK/soak$i.json" 2>"$WORK/soak$i.err" &
    LG_PIDS+=($!)
    PIDS+=($!)
done
# Bounded: the soak mode gives up connecting after 120 s itself.
first_ready=""
for _ in $(seq 1500); do
    ready=0
    for ((i = 0; i < LOADGENS; i++)); do
        grep -q '^READY' "$WORK/soak$i.json" 2>/dev/null && ready=$((ready + 1))
    done
    [ "$ready" -gt 0 ] && [ -z "$first_ready" ] && first_ready=$SECONDS
    [ "$ready" -eq "$LOADGENS" ] && break
    for ((i = 0; i < LOADGENS; i++)); do
        kill -0 "${LG_PIDS[$i]}" 2>/dev/null || grep -q '^READY' "$WORK/soak$i.json" ||
            die "soak process $i ended early: $(tail -n 3 "$WORK/soak$i.err")"
    done
    sleep 0.2
done
[ "$ready" -eq "$LOADGENS" ] || die "the clients did not connect"
[ $((SECONDS - first_ready)) -lt $((SLACK - SETTLE - 5)) ] ||
    die "the soak processes were ready $((SECONDS - first_ready)) s apart: the first would stop before the sampling ends"
connected=$(cat "$WORK"/soak*.json | awk '/^READY/ { s += $2 } END { print s }')
sleep "$SETTLE"
read -r -a BEFORE <<<"$(metrics | summarize)"
log "connected: $connected; live per backend before: ${BEFORE[*]:0:4}"

# The reload: a fourth backend, SIGHUP.
write_config 4
T0=$(date +%s.%N)
kill -HUP "$BERTH_PID"
log "SIGHUP sent; sampling /metrics every ${SAMPLE}s for ${SPAN}s"
SAMPLES=$WORK/samples.txt
: >"$SAMPLES"
end=$(awk -v t="$T0" -v s="$SPAN" 'BEGIN { printf "%.3f", t + s }')
while :; do
    now=$(date +%s.%N)
    awk -v n="$now" -v e="$end" 'BEGIN { exit !(n >= e) }' && break
    if line=$(metrics | summarize); then
        echo "$(awk -v n="$now" -v t="$T0" 'BEGIN { printf "%.3f", n - t }') $line" >>"$SAMPLES"
    fi
    sleep "$SAMPLE"
done
read -r -a AFTER <<<"$(metrics | summarize)"
log "live per backend after: ${AFTER[*]:0:4}; waiting for the clients' reports"

# The clients stop by themselves; bounded (their reconnect wait, drain and
# close limits come to under 2 minutes).
for ((i = 0; i < LOADGENS; i++)); do
    for _ in $(seq 900); do
        kill -0 "${LG_PIDS[$i]}" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "${LG_PIDS[$i]}" 2>/dev/null && die "soak process $i did not finish"
    wait "${LG_PIDS[$i]}" 2>/dev/null || true # exit 1: berth's 1012s fail the soak's "untouched" rule
done
for ((i = 0; i < LOADGENS; i++)); do
    grep -v '^READY' "$WORK/soak$i.json" >"$WORK/report$i.json"
    jq -e . "$WORK/report$i.json" >/dev/null || die "soak process $i wrote no report"
done
CLIENTS=$(jq -s '
    def sum(f): map(f) | add;
    def merge(f): map(f // {} | to_entries) | add | group_by(.key)
        | map({key: .[0].key, value: (map(.value) | add)}) | from_entries;
    {
        sessions: sum(.all.sessions), open_to_the_end: sum(.all.open_to_the_end),
        closed: merge(.all.closed_by_berth), dropped: sum(.all.dropped_without_close),
        first_drop: (map(.all.first_drop) | map(select(. != null)) | first),
        sent: sum(.all.messages_sent), lost: sum(.all.lost),
        duplicated: sum(.all.duplicated), reordered: sum(.all.reordered),
        corrupted: sum(.all.corrupted), unanswered: sum(.all.close_1000_unanswered),
        by_closes: merge(.clients_by_closes), connect_errors: sum(.connect_errors),
        connected_at_end: sum(.connected_at_end),
        lost_open: sum(.all.lost_open_to_the_end)
    }' "$WORK"/report*.json)
echo "$CLIENTS" >"$WORK/clients.json"

# Figures from the samples.
base=$((BEFORE[4] + BEFORE[5] + BEFORE[6] + BEFORE[7]))
stats=$(awk -v w="$WINDOW" -v base="$base" '
    { n++; for (i = 1; i <= 4; i++) if ($(i + 1) > max[i]) max[i] = $(i + 1)
      r = $6 + $7 + $8 + $9 - base; t[n] = $1; c[n] = r
      if (r > 0 && first == "") first = $1
      if (r > last_r) { last_r = r; last = $1 } }
    END {
        # Closes per tenth: the counter at the last sample at or before
        # each boundary; what came after the window is reported apart.
        for (k = 1; k <= 10; k++) {
            edge = w * k / 10; v = 0
            for (j = 1; j <= n; j++) if (t[j] <= edge) v = c[j]
            at[k] = v
        }
        tenths = at[1]
        for (k = 2; k <= 10; k++) tenths = tenths ", " (at[k] - at[k - 1])
        gap = 0; for (j = 2; j <= n; j++) if (t[j] - t[j - 1] > gap) gap = t[j] - t[j - 1]
        if (first == "") { first = "none"; last = "none" }
        printf "%d %.2f %d %d %d %d %d %s %s %s\n", n, gap, max[1], max[2], max[3], max[4],
            c[n] - at[10], first, last, tenths
    }' "$SAMPLES")
read -r samples gap m1 m2 m3 m4 after_window first last tenths <<<"$stats"
MAX=("$m1" "$m2" "$m3" "$m4")
MOVED=()
for i in 0 1 2 3; do MOVED+=($((AFTER[i + 4] - BEFORE[i + 4]))); done
rebalanced=$((AFTER[4] + AFTER[5] + AFTER[6] + AFTER[7] - BEFORE[4] - BEFORE[5] - BEFORE[6] - BEFORE[7]))
client_1012=$(jq '.closed["1012"] // 0' <<<"$CLIENTS")
total_after=$((AFTER[0] + AFTER[1] + AFTER[2] + AFTER[3]))
fair=$((total_after / 4))

verdict=()
for i in 0 1 2 3; do
    n=${AFTER[$i]}
    if [ $((n * 10)) -lt $((fair * 9)) ] || [ $((n * 10)) -gt $((fair * 11)) ]; then
        verdict+=("b$((i + 1)) holds $n, outside $fair ± 10 %")
    fi
done
for i in 0 1 2; do
    [ "${MAX[$i]}" -le $((BEFORE[i] + BEFORE[i] / 100)) ] ||
        verdict+=("b$((i + 1)) reached ${MAX[$i]}, above its ${BEFORE[$i]} at the reload")
done
[ "${AFTER[8]}" -gt "${BEFORE[8]}" ] || verdict+=("the reload did not succeed (berth_config_reloads_total{result=\"success\"} ${BEFORE[8]} -> ${AFTER[8]})")
[ "$base" -eq 0 ] || verdict+=("berth rebalanced $base connections before the reload")
[ $((rebalanced + base)) -eq "$client_1012" ] ||
    verdict+=("berth counted $((rebalanced + base)) rebalance closes, the clients $client_1012 Close 1012")
twice=$(jq '[.by_closes | to_entries[] | select((.key | tonumber) > 1) | .value] | add // 0' <<<"$CLIENTS")
[ "$twice" -eq 0 ] || verdict+=("$twice clients were closed more than once")
bad=$(jq '.duplicated + .reordered + .corrupted + .lost_open' <<<"$CLIENTS")
[ "$bad" -eq 0 ] || verdict+=("the clients saw $bad messages lost (on connections open to the end), duplicated, reordered or corrupted")
grep -q panicked "$WORK/berth.log" && verdict+=("berth logged a panic")
kill -0 "$BERTH_PID" 2>/dev/null || verdict+=("berth exited")
[ "${#verdict[@]}" -eq 0 ] && verdict_text="as expected" || verdict_text="NOT as expected: $(printf '%s; ' "${verdict[@]}")"

report=$(cat <<EOF
#### Rebalance at scale (\`benches/rebalance.sh\`)

- run: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); \`CONNECTIONS=$CONNECTIONS LOADGENS=$LOADGENS WINDOW=$WINDOW CLOSE_TIMEOUT=$CLOSE_TIMEOUT THRESHOLD=$THRESHOLD CONCURRENCY=$CONCURRENCY BERTH_WORKERS=$BERTH_WORKERS\`
- scenario: one berth, least connections, \`threshold = $THRESHOLD\`, \`window = "${WINDOW}s"\`, \`close_timeout = "${CLOSE_TIMEOUT}s"\`; $connected soak clients (a ${INTERVAL}s message each, every echo checked; a client closed by berth reconnects after 0.25-2 s); a fourth backend added by SIGHUP
- live WebSockets per backend (b1, b2, b3, b4) before the reload: ${BEFORE[0]}, ${BEFORE[1]}, ${BEFORE[2]}, ${BEFORE[3]}
- after window + close_timeout + ${MARGIN}s: ${AFTER[0]}, ${AFTER[1]}, ${AFTER[2]}, ${AFTER[3]} (total $total_after; a quarter is $fair)
- highest sampled during the run ($samples samples of /metrics, every ${SAMPLE}s, longest gap ${gap}s): ${MAX[0]}, ${MAX[1]}, ${MAX[2]}, ${MAX[3]}
- rebalance closes (\`berth_websocket_rebalanced_total\`): $rebalanced (b1 ${MOVED[0]}, b2 ${MOVED[1]}, b3 ${MOVED[2]}, b4 ${MOVED[3]}); first seen at $first s, last at $last s after the SIGHUP
- closes per tenth of the window (the counter at the last sample before each tenth's end, so a close within a sample of the end counts in the next): $tenths; after the window: $after_window
- clients: Close codes received $(jq -c .closed <<<"$CLIENTS"), $(jq .dropped <<<"$CLIENTS") dropped without a Close; clients by how many times berth closed them: $(jq -c .by_closes <<<"$CLIENTS") (closed twice or more: $twice)
- clients' verification: $(jq .sessions <<<"$CLIENTS") sessions, $(jq .sent <<<"$CLIENTS") messages; lost $(jq .lost <<<"$CLIENTS") (on connections open to the end: $(jq .lost_open <<<"$CLIENTS"); the rest were in flight when berth closed), duplicated $(jq .duplicated <<<"$CLIENTS"), reordered $(jq .reordered <<<"$CLIENTS"), corrupted $(jq .corrupted <<<"$CLIENTS"); $(jq .connected_at_end <<<"$CLIENTS") connected at the end, $(jq .connect_errors <<<"$CLIENTS") failed connects
- berth's figures against the clients': $((rebalanced + base)) rebalance closes counted by berth since it started ($base before the reload), $client_1012 Close 1012 received by the clients
- verdict: $verdict_text
EOF
)
echo "$report"
[ -z "$OUT" ] || echo "$report" >"$OUT"
