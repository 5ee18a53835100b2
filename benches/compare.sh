#!/usr/bin/env bash
# berth vs nginx vs HAProxy, with a direct connection to one echo backend as
# the floor/ceiling. Writes benches/results/latest.md.
#
#   benches/compare.sh            # the full suite: ~10 s runs, 3 repetitions, 9,900 idle connections
#   QUICK=1 benches/compare.sh    # a trial: ~2 s runs, 1 repetition, 1,000 idle connections
#
# Every proxy runs on core 0 (taskset; berth with BERTH_WORKERS=1, nginx with
# one worker, HAProxy with nbthread 1); the load generator and the echo
# backends (one process, three listeners) run on core 1. Each run starts the
# proxy afresh and stops it afterwards; the targets are alternated within each
# test and repetition. The headline figures are the proxy's CPU time per
# message (utime+stime from /proc/PID/stat over the measurement), its RSS
# growth per idle connection (VmRSS before opening and while holding),
# messages/s and latency percentiles; the ir64-* tests count the proxy's
# user-space instructions per message with callgrind (see run_one and
# benches/README.md). All processes this script starts are stopped on exit.
#
# Targets: berth (aws-lc-rs, the default TLS provider), berth-ring (the same
# berth built with --no-default-features: ring; only in the RING_TESTS), nginx,
# HAProxy, and direct (no proxy; not in the ir64, storm and pq tests).
#
# Environment (defaults in brackets, QUICK values after the slash):
#   DURATION      seconds per throughput/latency/handshake run [10 / 2]
#   REPS          repetitions [3 / 1]
#   LAT_REPS      repetitions of the lat-* tests [5 / 2]
#   IDLE_CONNS    idle connections [9900 / 1000]
#   IDLE_HOLD     seconds the idle connections are held [6 / 3]
#   IR_DURATION   seconds of the instrumented window of ir64-* [20 / 5]
#   IR_WARMUP     seconds of load before it [3 / 2]
#   IR_CONNS      connections of ir64-* (8 messages in flight each) [4]
#   IR_REPS       repetitions of ir64-* (the counts vary little) [1]
#   STORM_CONNS   clients of storm-wss [9000 / 1000]
#   BUILD_TIME=1  time a clean release build of berth with each TLS provider,
#                 in throw-away target directories [1 / 0]
#   TARGETS       targets, in column order [berth berth-ring nginx haproxy direct]
#   TESTS         tests to run [all: tp64-ws ir64-ws tp64-wss ir64-wss
#                 tp64k-wss lat-c1-wss lat-c100-wss hs-c50-wss
#                 hs-c50-wss-resume hs-c50-wss-pq idle-ws idle-wss storm-wss
#                 tp64-wss-h2 idle-wss-h2-0 idle-wss-h2-1 idle-wss-h2-100]
#                 (the *-h2* tests: WebSockets over HTTP/2, RFC 8441; berth
#                 and HAProxy only)
#   RING_TESTS    the tests berth-ring runs [tp64-wss ir64-wss tp64k-wss
#                 hs-c50-wss hs-c50-wss-resume idle-wss]
#   PROXY_CORE    core for the proxy [0];  LOAD_CORE: core for load + backends [1]
#   OUT           the report [benches/results/latest.md]
#   KEEP_WORK=1   keep the work directory (configs, logs, raw JSON) afterwards;
#                 it is also kept, without the binaries, when an ir64 test
#                 ran: its profiles/ holds callgrind_annotate output
#
# Exit status: 0 when every run succeeded without verification errors, 1 when
# some did not (the report is written either way and lists them), 2 on a
# setup failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    DURATION=${DURATION:-2}
    REPS=${REPS:-1}
    IDLE_CONNS=${IDLE_CONNS:-1000}
    IDLE_HOLD=${IDLE_HOLD:-3}
    LAT_REPS=${LAT_REPS:-2}
    IR_DURATION=${IR_DURATION:-5}
    IR_WARMUP=${IR_WARMUP:-2}
    STORM_CONNS=${STORM_CONNS:-1000}
    BUILD_TIME=${BUILD_TIME:-0}
else
    DURATION=${DURATION:-10}
    REPS=${REPS:-3}
    IDLE_CONNS=${IDLE_CONNS:-9900}
    IDLE_HOLD=${IDLE_HOLD:-6}
    LAT_REPS=${LAT_REPS:-5}
    IR_DURATION=${IR_DURATION:-20}
    IR_WARMUP=${IR_WARMUP:-3}
    STORM_CONNS=${STORM_CONNS:-9000}
    BUILD_TIME=${BUILD_TIME:-1}
fi
IR_CONNS=${IR_CONNS:-4}
IR_REPS=${IR_REPS:-1}
read -r -a TARGETS <<<"${TARGETS:-berth berth-ring nginx haproxy direct}"
read -r -a TESTS <<<"${TESTS:-tp64-ws ir64-ws tp64-wss ir64-wss tp64k-wss lat-c1-wss lat-c100-wss hs-c50-wss hs-c50-wss-resume hs-c50-wss-pq idle-ws idle-wss storm-wss tp64-wss-h2 idle-wss-h2-0 idle-wss-h2-1 idle-wss-h2-100}"
RING_TESTS=" ${RING_TESTS:-tp64-wss ir64-wss tp64k-wss hs-c50-wss hs-c50-wss-resume idle-wss} "
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
OUT=${OUT:-benches/results/latest.md}
CERT=$ROOT/certs/example.crt
KEY=$ROOT/certs/example.key
SOURCE_IPS=127.0.0.2-127.0.0.250

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 2; }

# --- the proxies -------------------------------------------------------------

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} from Debian's packages"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) is missing"
case " ${TESTS[*]} " in
*" ir64-"*)
    if ! command -v callgrind_control >/dev/null 2>&1; then
        log "installing valgrind from Debian's packages (the ir64 tests use callgrind)"
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
    fi
    ;;
esac

# --- build -------------------------------------------------------------------

WORK=$(mktemp -d /tmp/berth-bench.XXXXXX)
chmod 755 "$WORK"
RES=$WORK/results
mkdir -p "$RES" "$WORK/nginx" "$WORK/bin" "$WORK/profiles"
trap 'rm -rf "$WORK"' EXIT

# build FLAGS SUFFIX: builds berth and the loadgen (with the cargo flags
# FLAGS, e.g. --no-default-features) and copies them to $WORK/bin/berth$SUFFIX
# and loadgen$SUFFIX. Run copies: another cargo build in this tree must not
# swap the binaries halfway through the suite (and the two provider builds
# overwrite target/release/berth).
. benches/lib.sh
build() {
    local flags=$1 suffix=$2
    log "building berth and the loadgen (release${flags:+, $flags})"
    # shellcheck disable=SC2086 # FLAGS is a list of cargo flags
    build_binaries "$WORK/bin" "$suffix" --release $flags || die "the build failed"
}
build "" ""
need_ring=0
for t in "${TARGETS[@]}"; do [ "$t" = berth-ring ] && need_ring=1; done
[ "$need_ring" = 0 ] || build --no-default-features -ring
BERTH=$WORK/bin/berth
# The loadgen (aws-lc-rs, like berth's default build) offers the classical
# key exchange groups unless told otherwise (--kx), whatever the proxy prefers.
LOADGEN=$WORK/bin/loadgen
BERTH_RING=$WORK/bin/berth-ring
BACKEND_PID=""
TARGET_PID=""
LOADGEN_PID=""
FAILED=0

stop_pid() { # PID: TERM, up to 5 s, then KILL; reaps it
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    stop_pid "$LOADGEN_PID"
    stop_pid "$TARGET_PID"
    stop_pid "$BACKEND_PID"
    if [ "${KEEP_WORK:-0}" = 1 ] || [ "$rc" -ge 2 ]; then
        echo "compare.sh: work directory kept: $WORK" >&2
    elif [ -n "$(ls -A "$WORK/profiles" 2>/dev/null)" ]; then
        rm -rf "$WORK/bin" "$WORK"/build-*
        echo "compare.sh: work directory kept for its callgrind profiles: $WORK/profiles" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

children_of() { # PID: direct children, from /proc
    local f
    for f in /proc/[0-9]*/stat; do
        # Field 4 (after the command in parentheses) is the parent pid.
        if [ "$(sed 's/.*) //' "$f" 2>/dev/null | cut -d' ' -f2)" = "$1" ]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

rss_kb() { # PIDS...: summed VmRSS in KiB
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

read -r PB1 PB2 PB3 PBS PBERTH PBERTHS PNGX PNGXS PHAP PHAPS <<<"$("$LOADGEN" free-ports --count 10)"

log "starting the echo backends on core $LOAD_CORE (ports $PB1 $PB2 $PB3, TLS $PBS)"
taskset -c "$LOAD_CORE" "$LOADGEN" echo-backend \
    --listen "127.0.0.1:$PB1" --listen "127.0.0.1:$PB2" --listen "127.0.0.1:$PB3" \
    --tls-listen "127.0.0.1:$PBS" --cert "$CERT" --key "$KEY" \
    >"$WORK/backend.out" 2>"$WORK/backend.err" &
BACKEND_PID=$!
for _ in $(seq 100); do
    [ "$(grep -c '^LISTENING' "$WORK/backend.out" 2>/dev/null || true)" -ge 4 ] && break
    alive "$BACKEND_PID" || die "the echo backend exited: $(cat "$WORK/backend.err")"
    sleep 0.1
done

# --- configs -----------------------------------------------------------------

cat >"$WORK/berth.toml" <<EOF
shutdown_window = "1s"

[[listeners]]
name = "ws"
bind = "127.0.0.1:$PBERTH"

[[listeners]]
name = "wss"
bind = "127.0.0.1:$PBERTHS"
tls = { cert = "$CERT", key = "$KEY" }

[[routes]]
path_prefix = "/"
pool = "echo"

[pools.echo]
balance = "round_robin"

[[pools.echo.backends]]
id = "echo-1"
address = "127.0.0.1:$PB1"

[[pools.echo.backends]]
id = "echo-2"
address = "127.0.0.1:$PB2"

[[pools.echo.backends]]
id = "echo-3"
address = "127.0.0.1:$PB3"
EOF
"$BERTH" check --config "$WORK/berth.toml" >/dev/null || die "berth rejects the benchmark config"

# nginx's worker_connections counts both sides of a proxied connection, and
# nginx starts closing connections that have not sent a request yet ("20000
# worker_connections are not enough, reusing connections") once fewer than a
# sixteenth of them are free: at 20000, 9,900 idle WebSockets (19,800
# connections) lose about 500 of the last handshakes. 24000 keeps that
# threshold out of reach; descriptors stay within worker_rlimit_nofile 20000
# (nginx warns that 24000 exceeds it, which is harmless here).
cat >"$WORK/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx-error.log warn;

events {
    worker_connections 24000;
}

http {
    access_log off;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;

    upstream echo {
        server 127.0.0.1:$PB1;
        server 127.0.0.1:$PB2;
        server 127.0.0.1:$PB3;
    }

    server {
        listen 127.0.0.1:$PNGX backlog=4096;
        listen 127.0.0.1:$PNGXS ssl backlog=4096;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;

        location / {
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
    }
}
EOF
"$NGINX" -t -q -c "$WORK/nginx.conf" -p "$WORK/nginx/" -e "$WORK/nginx-error.log" ||
    die "nginx rejects the benchmark config"
# The same as one process, for callgrind: the worker's work in the process
# valgrind runs.
sed 's/^master_process on;/master_process off;/' "$WORK/nginx.conf" >"$WORK/nginx-single.conf"

# HAProxy's maxconn counts client sessions and reserves two descriptors for
# each, so "maxconn 20000" asks for 40,015 and HAProxy refuses to start under
# the 20,000 hard limit ("Cannot raise FD limit to 40015, limit is 20000").
# 9,990 sessions (19,995 descriptors) is the most that fits: about what nginx
# can proxy within its 20,000 descriptors too, and above the 9,900 of the idle
# test. The TLS bind offers h2 for the *-h2* tests: HAProxy (since 2.4)
# accepts WebSockets over HTTP/2 (RFC 8441) on an h2 front end with nothing
# more to configure, and speaks HTTP/1.1 to the backends; the HTTP/1.1 tests'
# clients offer only http/1.1, so they are unaffected.
cat "$CERT" "$KEY" >"$WORK/combined.pem"
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 9990
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    maxconn 9990
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    option forwardfor

frontend fe
    bind 127.0.0.1:$PHAP
    bind 127.0.0.1:$PHAPS ssl crt $WORK/combined.pem alpn h2,http/1.1
    default_backend echo

backend echo
    balance roundrobin
    cookie SRV insert indirect nocache
    server echo-1 127.0.0.1:$PB1 cookie echo-1
    server echo-2 127.0.0.1:$PB2 cookie echo-2
    server echo-3 127.0.0.1:$PB3 cookie echo-3
EOF
"$HAPROXY" -c -q -f "$WORK/haproxy.cfg" >"$WORK/haproxy-check.log" 2>&1 ||
    die "haproxy rejects the benchmark config: $(cat "$WORK/haproxy-check.log")"
# Under valgrind, which keeps a few descriptors for itself, the 19,995 that
# maxconn 9990 needs are not to be had; the ir64 tests use a handful.
sed 's/maxconn 9990/maxconn 1000/' "$WORK/haproxy.cfg" >"$WORK/haproxy-valgrind.cfg"

# --- targets -----------------------------------------------------------------

# start_target NAME [CALLGRIND_OUT]: sets TARGET_PID (what to stop), WATCH
# (what to measure), URL_WS and URL_WSS. With CALLGRIND_OUT the proxy runs
# under callgrind with instrumentation off (the ir64 tests switch it on for
# the measured window), writing its dumps to CALLGRIND_OUT and its log to
# CALLGRIND_OUT.log; nginx then runs as one process (master_process off) so
# that the process under valgrind is the one doing the work.
start_target() {
    WATCH=()
    local pre=(taskset -c "$PROXY_CORE") wait=100
    if [ -n "${2:-}" ]; then
        pre+=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$2"
            --log-file="$2.log")
        wait=600 # valgrind starts the proxy ~50x slower
    fi
    case $1 in
    berth | berth-ring)
        local bin=$BERTH
        [ "$1" = berth ] || bin=$BERTH_RING
        BERTH_WORKERS=1 "${pre[@]}" "$bin" run --config "$WORK/berth.toml" \
            --log-level warn >>"$WORK/$1.log" 2>&1 &
        TARGET_PID=$!
        wait_port "$PBERTH" "$TARGET_PID" "$wait" || return 1
        WATCH=("$TARGET_PID")
        URL_WS=ws://127.0.0.1:$PBERTH/
        URL_WSS=wss://127.0.0.1:$PBERTHS/
        ;;
    nginx)
        local conf=$WORK/nginx.conf
        [ -z "${2:-}" ] || conf=$WORK/nginx-single.conf
        "${pre[@]}" "$NGINX" -c "$conf" -p "$WORK/nginx/" \
            -e "$WORK/nginx-error.log" >>"$WORK/nginx.log" 2>&1 &
        TARGET_PID=$!
        wait_port "$PNGX" "$TARGET_PID" "$wait" || return 1
        if [ -n "${2:-}" ]; then
            WATCH=("$TARGET_PID")
            URL_WS=ws://127.0.0.1:$PNGX/
            URL_WSS=wss://127.0.0.1:$PNGXS/
            sleep 0.2
            return 0
        fi
        # The master binds before it forks the worker: wait for the worker.
        for _ in $(seq 50); do
            read -r -a WATCH <<<"$(children_of "$TARGET_PID" | tr '\n' ' ')"
            [ ${#WATCH[@]} -eq 0 ] || break
            sleep 0.1
        done
        [ ${#WATCH[@]} -gt 0 ] || return 1
        URL_WS=ws://127.0.0.1:$PNGX/
        URL_WSS=wss://127.0.0.1:$PNGXS/
        ;;
    haproxy)
        local cfg=$WORK/haproxy.cfg
        [ -z "${2:-}" ] || cfg=$WORK/haproxy-valgrind.cfg
        "${pre[@]}" "$HAPROXY" -f "$cfg" -db >>"$WORK/haproxy.log" 2>&1 &
        TARGET_PID=$!
        wait_port "$PHAP" "$TARGET_PID" "$wait" || return 1
        WATCH=("$TARGET_PID")
        URL_WS=ws://127.0.0.1:$PHAP/
        URL_WSS=wss://127.0.0.1:$PHAPS/
        ;;
    direct)
        TARGET_PID=""
        URL_WS=ws://127.0.0.1:$PB1/
        URL_WSS=wss://127.0.0.1:$PBS/
        ;;
    *) die "unknown target $1" ;;
    esac
    sleep 0.2
}

stop_target() {
    stop_pid "$TARGET_PID"
    TARGET_PID=""
}

describe() {
    case $1 in
    tp64-ws) echo "64 B messages, 100 connections × 8 in flight, ws" ;;
    tp64-wss) echo "64 B messages, 100 connections × 8 in flight, wss" ;;
    tp64k-wss) echo "64 KiB messages, 10 connections × 4 in flight, wss" ;;
    lat-c1-wss) echo "latency, 1 connection, one 64 B message in flight, wss" ;;
    lat-c100-wss) echo "latency, 100 connections, one 64 B message in flight each, wss" ;;
    hs-c50-wss) echo "handshakes: TCP + TLS + upgrade, one echo, close; 50 concurrent, wss; full TLS handshakes" ;;
    hs-c50-wss-resume) echo "handshakes as hs-c50-wss, but the client resumes TLS sessions (the proxy's tickets or session cache)" ;;
    idle-ws) echo "$IDLE_CONNS idle connections held ${IDLE_HOLD}s, ws; the open phase gives the CPU per opened WebSocket" ;;
    idle-wss) echo "$IDLE_CONNS idle connections held ${IDLE_HOLD}s, wss" ;;
    ir64-ws | ir64-wss) echo "user-space instructions per 64 B message (callgrind, instrumentation on for the ${IR_DURATION}s measured window only, after ${IR_WARMUP}s of warm-up), $IR_CONNS connections × 8 in flight, ${1#ir64-}" ;;
    hs-c50-wss-pq) echo "handshakes as hs-c50-wss, the client offering only the post-quantum hybrid X25519MLKEM768" ;;
    tp64-wss-h2) echo "64 B messages over HTTP/2 (RFC 8441, TLS with ALPN h2): 100 WebSockets × 8 in flight, 10 per HTTP/2 connection" ;;
    idle-wss-h2-0) echo "$IDLE_CONNS idle HTTP/2 connections (wss, ALPN h2) that open no stream, held ${IDLE_HOLD}s: what the connection itself costs, before any WebSocket" ;;
    idle-wss-h2-1) echo "$IDLE_CONNS idle WebSockets over HTTP/2 (RFC 8441, wss), one per HTTP/2 connection, held ${IDLE_HOLD}s" ;;
    idle-wss-h2-100) echo "$IDLE_CONNS idle WebSockets over HTTP/2 (RFC 8441, wss), 100 per HTTP/2 connection, held ${IDLE_HOLD}s" ;;
    storm-wss) echo "reconnect storm: $STORM_CONNS wss clients, each with its own TLS session cache, cut at once by the backend (SIGUSR1: it closes every connection), reconnect at once resuming their sessions" ;;
    *) die "unknown test $1" ;;
    esac
}

# loadgen_args TEST: the loadgen arguments (after start_target set the URLs).
loadgen_args() {
    local url=$URL_WS
    case $1 in *-wss | *-wss-*) url=$URL_WSS ;; esac
    local common=(--url "$url" --ca "$CERT")
    case $1 in
    tp64-ws | tp64-wss) echo throughput "${common[@]}" --connections 100 --window 8 --size 64 --duration "$DURATION" ;;
    tp64k-wss) echo throughput "${common[@]}" --connections 10 --window 4 --size 65536 --duration "$DURATION" ;;
    lat-c1-wss) echo latency "${common[@]}" --connections 1 --duration "$DURATION" ;;
    lat-c100-wss) echo latency "${common[@]}" --connections 100 --duration "$DURATION" ;;
    hs-c50-wss) echo handshake "${common[@]}" --concurrency 50 --duration "$DURATION" --source-ips "$SOURCE_IPS" ;;
    hs-c50-wss-resume) echo handshake "${common[@]}" --concurrency 50 --duration "$DURATION" --source-ips "$SOURCE_IPS" --resume ;;
    hs-c50-wss-pq) echo handshake "${common[@]}" --concurrency 50 --duration "$DURATION" --source-ips "$SOURCE_IPS" --kx X25519MLKEM768 ;;
    idle-ws | idle-wss) echo idle "${common[@]}" --connections "$IDLE_CONNS" --hold "$IDLE_HOLD" --source-ips "$SOURCE_IPS" ;;
    ir64-ws | ir64-wss) echo throughput "${common[@]}" --connections "$IR_CONNS" --window 8 --size 64 --warmup "$IR_WARMUP" --duration "$IR_DURATION" ;;
    storm-wss) echo storm "${common[@]}" --connections "$STORM_CONNS" --source-ips "$SOURCE_IPS" ;;
    tp64-wss-h2) echo throughput "${common[@]}" --connections 100 --window 8 --size 64 --duration "$DURATION" --h2-streams 10 ;;
    idle-wss-h2-0) echo idle "${common[@]}" --connections "$IDLE_CONNS" --hold "$IDLE_HOLD" --source-ips "$SOURCE_IPS" --h2-streams 0 ;;
    idle-wss-h2-1) echo idle "${common[@]}" --connections "$IDLE_CONNS" --hold "$IDLE_HOLD" --source-ips "$SOURCE_IPS" --h2-streams 1 ;;
    idle-wss-h2-100) echo idle "${common[@]}" --connections "$IDLE_CONNS" --hold "$IDLE_HOLD" --source-ips "$SOURCE_IPS" --h2-streams 100 ;;
    esac
}

# skip_reason TEST TARGET: why TARGET does not run TEST (nothing when it does).
skip_reason() {
    case $2:$1 in
    direct:ir64-* | direct:storm-*) echo "no proxy" ;;
    direct:*-h2*) echo "the echo backend speaks HTTP/1.1 only" ;;
    nginx:*-h2*) echo "no WebSockets over HTTP/2 (RFC 8441; nginx ticket 1428)" ;;
    direct:hs-c50-wss-pq) echo "the echo backend's own TLS" ;;
    berth-ring:hs-c50-wss-pq) echo "ring has no X25519MLKEM768" ;;
    nginx:hs-c50-wss-pq | haproxy:hs-c50-wss-pq) echo "cannot offer X25519MLKEM768 (Debian's build on OpenSSL 3.0)" ;;
    berth-ring:*) case $RING_TESTS in *" $1 "*) ;; *) echo "not in RING_TESTS" ;; esac ;;
    esac
}

# reps_of TEST: the repetitions TEST runs.
reps_of() {
    case $1 in
    lat-*) echo "$LAT_REPS" ;;
    ir64-*) echo "$IR_REPS" ;;
    *) echo "$REPS" ;;
    esac
}

jget() { # FILE KEY: a top-level number from the JSON line
    { grep -o "\"$2\":[-0-9.e]*" "$1" 2>/dev/null || true; } | head -n 1 | cut -d: -f2
}

# ir_total FILES...: the summed "totals:" (Ir) of callgrind dumps.
ir_total() {
    awk '/^totals:/ {s += $2} END {printf "%.0f\n", s}' "$@" 2>/dev/null
}

run_one() { # TEST TARGET REP
    local test=$1 target=$2 rep=$3
    local base=$RES/${test}__${target}__${rep}
    local why
    why=$(skip_reason "$test" "$target")
    if [ -n "$why" ]; then
        echo "$why" >"$base.skip"
        return
    fi
    local cg=""
    case $test in ir64-*)
        mkdir -p "$WORK/callgrind"
        cg=$WORK/callgrind/${test}__${target}__${rep}.out
        ;;
    esac
    if ! start_target "$target" "$cg"; then
        echo "$target did not start (see its log in the work directory)" >"$base.fail"
        FAILED=1
        stop_target
        log "$test $target #$rep: FAILED to start"
        return
    fi
    local args watch=()
    read -r -a args <<<"$(loadgen_args "$test")"
    local pid
    for pid in "${WATCH[@]}"; do watch+=(--watch-pid "$pid"); done
    local limit=$((${DURATION%.*} + 60))
    local rc=0
    case $test in
    ir64-*)
        # The instrumentation goes on and off with no message in flight (the
        # loadgen drains between phases), so the dump's instructions are
        # exactly those of the messages counted in the measured window. The
        # watched CPU time under valgrind means nothing: none is taken.
        limit=$((${IR_WARMUP%.*} + ${IR_DURATION%.*} + 180))
        taskset -c "$LOAD_CORE" timeout "$limit" "$LOADGEN" "${args[@]}" \
            --start-cmd "callgrind_control -i on $TARGET_PID" \
            --end-cmd "callgrind_control -i off $TARGET_PID && callgrind_control -d $TARGET_PID" \
            >"$base.json" 2>"$base.err" || rc=$?
        ;;
    storm-*)
        limit=240
        taskset -c "$LOAD_CORE" timeout "$limit" "$LOADGEN" "${args[@]}" "${watch[@]}" \
            --cut-cmd "kill -USR1 $BACKEND_PID" >"$base.json" 2>"$base.err" || rc=$?
        ;;
    idle-*)
        limit=$((${IDLE_HOLD%.*} + 180))
        local before held=""
        before=$(rss_kb "${WATCH[@]}")
        taskset -c "$LOAD_CORE" timeout "$limit" "$LOADGEN" "${args[@]}" "${watch[@]}" \
            >"$base.out" 2>"$base.err" &
        LOADGEN_PID=$!
        while alive "$LOADGEN_PID" && ! grep -q '^READY' "$base.out" 2>/dev/null; do sleep 0.05; done
        if grep -q '^READY' "$base.out" 2>/dev/null; then
            sleep 1 # let the proxy settle after the last handshake
            held=$(rss_kb "${WATCH[@]}")
        fi
        wait "$LOADGEN_PID" || rc=$?
        LOADGEN_PID=""
        grep -v '^READY' "$base.out" >"$base.json" || true
        rm -f "$base.out"
        if [ ${#WATCH[@]} -gt 0 ] && [ -n "$held" ]; then echo "$before $held" >"$base.rss"; fi
        ;;
    *)
        taskset -c "$LOAD_CORE" timeout "$limit" "$LOADGEN" "${args[@]}" "${watch[@]}" \
            >"$base.json" 2>"$base.err" || rc=$?
        ;;
    esac
    if [ "$rc" -ne 0 ]; then
        echo "loadgen exited with $rc: $(tail -n 1 "$base.err")" >"$base.fail"
        FAILED=1
    elif [ -n "$TARGET_PID" ] && ! alive "$TARGET_PID"; then
        echo "$target exited during the run" >"$base.fail"
        FAILED=1
    fi
    local verr
    verr=$(jget "$base.json" verification_errors)
    if [ -n "$verr" ] && [ "$verr" != 0 ]; then FAILED=1; fi
    stop_target
    if [ -n "$cg" ]; then
        # The measured window's dump (callgrind_control -d) plus the one at
        # exit (next to nothing: instrumentation was off by then).
        local dumps=() f
        for f in "$cg"*; do
            case $f in *.log) ;; *) [ -f "$f" ] && dumps+=("$f") ;; esac
        done
        # valgrind's closing "Collected" figure (what the instrumented
        # window counted); the dumps' totals if valgrind did not get to say.
        local collected
        collected=$(sed -n 's/.*Collected : *\([0-9]*\).*/\1/p' "$cg.log" 2>/dev/null | tail -n 1)
        if [ -n "$collected" ]; then
            echo "$collected" >"$base.ir"
        elif [ ${#dumps[@]} -gt 0 ]; then
            ir_total "${dumps[@]}" >"$base.ir"
        fi
        case $target in berth*)
            # The profile of the measured window: the dump with the most
            # instructions.
            local d best="" most=-1 n
            for d in "${dumps[@]}"; do
                n=$(ir_total "$d")
                if [ "${n:-0}" -gt "$most" ]; then most=${n:-0} best=$d; fi
            done
            if [ -n "$best" ]; then
                local prof=$WORK/profiles/${test}__${target}__${rep}
                callgrind_annotate --threshold=99 "$best" >"$prof.self.txt" 2>/dev/null || true
                callgrind_annotate --threshold=99 --inclusive=yes "$best" >"$prof.inclusive.txt" 2>/dev/null || true
                cp "$best" "$prof.callgrind"
            fi
            ;;
        esac
    fi
    case $test in
    ir*) log "$test $target #$rep: $(jget "$base.json" messages) messages, $(cat "$base.ir") instructions, $(awk -v m="$(jget "$base.json" messages)" '{ if (m > 0) printf "%.0f", $1 / m; else print "-" }' "$base.ir") per message" ;;
    storm*) log "$test $target #$rep: $(jget "$base.json" reestablished) of $(jget "$base.json" opened) back in $(jget "$base.json" reconnect_secs)s, $(jget "$base.json" resumed) resumed, cpu $(jget "$base.json" proxy_cpu_secs)s" ;;
    tp*) log "$test $target #$rep: $(jget "$base.json" msgs_per_sec) msgs/s, cpu $(jget "$base.json" proxy_cpu_secs)s, verification errors ${verr:-?}" ;;
    lat*) log "$test $target #$rep: p50 $(jget "$base.json" p50_us) µs, p99 $(jget "$base.json" p99_us) µs, verification errors ${verr:-?}" ;;
    hs*) log "$test $target #$rep: $(jget "$base.json" handshakes_per_sec) handshakes/s, $(jget "$base.json" resumed) resumed, errors $(jget "$base.json" errors)" ;;
    idle*) log "$test $target #$rep: opened $(jget "$base.json" opened), alive $(jget "$base.json" alive_after_hold), rss $(cat "$base.rss" 2>/dev/null || echo -)" ;;
    esac
    if [ -f "$base.fail" ]; then log "$test $target #$rep: FAILED: $(cat "$base.fail")"; fi
}

# --- the suite ---------------------------------------------------------------

cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'machine\t%s cores (nproc), %s, %s, kernel %s\n' "$(nproc)" "${cpu_model:-unknown CPU}" \
        "$(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)" "$(uname -r)"
    printf 'load average at start\t%s (the machine may be shared)\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'berth\t%s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain -- src 2>/dev/null | grep -q . && echo " + uncommitted changes in src/")"
    printf 'nginx\t%s\n' "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
    printf 'haproxy\t%s\n' "$("$HAPROXY" -v | head -n 1)"
    printf 'rustc\t%s\n' "$(rustc --version)"
    printf 'settings\t%s\n' "QUICK=$QUICK, ${DURATION}s runs, $REPS repetition(s), $IDLE_CONNS idle connections held ${IDLE_HOLD}s; proxy on core $PROXY_CORE, loadgen + backends on core $LOAD_CORE; logging off or at warn everywhere"
} >"$RES/meta.tsv"
for t in "${TESTS[@]}"; do printf '%s\t%s\n' "$t" "$(describe "$t")"; done >"$RES/tests.tsv"

n=${#TARGETS[@]}
max_reps=$REPS
for test in "${TESTS[@]}"; do
    r=$(reps_of "$test")
    [ "$r" -le "$max_reps" ] || max_reps=$r
done
for rep in $(seq "$max_reps"); do
    ti=0
    for test in "${TESTS[@]}"; do
        if [ "$rep" -gt "$(reps_of "$test")" ]; then
            ti=$((ti + 1))
            continue
        fi
        # Alternate: each test and repetition starts with a different target.
        for k in $(seq 0 $((n - 1))); do
            run_one "$test" "${TARGETS[$(((k + ti + rep - 1) % n))]}" "$rep"
        done
        ti=$((ti + 1))
    done
done

printf 'load average at end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/meta.tsv"

# The TLS provider's build figures: binary sizes and, with BUILD_TIME=1, a
# clean release build of berth with each provider (after the load tests, so
# that the builds do not heat the machine under them), in throw-away target
# directories (about 2 GB each while they last).
if [ "$need_ring" = 1 ]; then
    mib() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f", b / 1048576 }'; }
    strip -o "$WORK/bin/berth.stripped" "$BERTH"
    strip -o "$WORK/bin/berth-ring.stripped" "$BERTH_RING"
    {
        printf 'berth binary, MiB (release profile, debug = 1)\t%s\t%s\n' "$(mib "$BERTH")" "$(mib "$BERTH_RING")"
        printf 'berth binary stripped, MiB\t%s\t%s\n' "$(mib "$WORK/bin/berth.stripped")" "$(mib "$WORK/bin/berth-ring.stripped")"
    } >"$RES/provider.tsv"
    if [ "$BUILD_TIME" = 1 ]; then
        # Wall time moves with the neighbours' builds; the CPU time (user +
        # system of cargo and the compilers) much less.
        walls=() cpus=()
        for provider in aws-lc ring; do
            flags=""
            [ "$provider" = aws-lc ] || flags=--no-default-features
            log "timing a clean release build of berth with $provider"
            dir=$WORK/build-$provider
            TIMEFORMAT='%R %U %S'
            # shellcheck disable=SC2086 # flags is a list of cargo flags
            if { time cargo build --release --bin berth $flags \
                --target-dir "$dir" >"$WORK/build-$provider.log" 2>&1; } 2>"$WORK/build-time"; then
                read -r wall user sys <"$WORK/build-time"
                walls+=("$(printf '%.0f' "$wall")")
                cpus+=("$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.0f", u + s }')")
            else
                walls+=(failed) cpus+=(failed)
            fi
            rm -rf "$dir"
        done
        {
            printf 'clean release build of berth, wall s (CARGO_BUILD_JOBS=%s, load average %s at the end)\t%s\t%s\n' \
                "${CARGO_BUILD_JOBS:-all cores}" "$(cut -d' ' -f1 /proc/loadavg)" "${walls[0]}" "${walls[1]}"
            printf 'clean release build of berth, CPU s (user + system)\t%s\t%s\n' "${cpus[0]}" "${cpus[1]}"
        } >>"$RES/provider.tsv"
    fi
fi
mkdir -p "$(dirname "$OUT")"
targets_csv=$(
    IFS=,
    echo "${TARGETS[*]}"
)
"$LOADGEN" report --dir "$RES" --targets "$targets_csv" --out "$OUT"
log "report written to $OUT"
cat "$OUT"
if [ "$FAILED" != 0 ]; then
    echo "compare.sh: some runs failed or had verification errors (see the report)" >&2
    exit 1
fi
