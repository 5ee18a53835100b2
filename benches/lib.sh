# shellcheck shell=bash
# Shared by the benchmark scripts: source it (`. benches/lib.sh`) from the
# repository root.

# build_binaries DIR SUFFIX [CARGO_FLAGS...]: builds berth and the loadgen
# (`cargo build CARGO_FLAGS`, e.g. --release or --no-default-features) and
# copies them to DIR/berthSUFFIX and DIR/loadgenSUFFIX. The scripts run the
# copies, so that another cargo build in this tree cannot swap a binary
# halfway through a run. Returns 1, saying why, when a binary is missing.
build_binaries() {
    local dir=$1 suffix=$2 json berth loadgen
    shift 2
    cargo build "$@" --bin berth --bench loadgen || return 1
    json=$(cargo build "$@" --bin berth --bench loadgen --message-format=json 2>/dev/null)
    berth=$(built_executable "$json" berth bin)
    loadgen=$(built_executable "$json" loadgen bench)
    if [ ! -x "$berth" ] || [ ! -x "$loadgen" ]; then
        echo "cannot find the built berth and loadgen binaries" >&2
        return 1
    fi
    cp "$berth" "$dir/berth$suffix"
    cp "$loadgen" "$dir/loadgen$suffix"
}

# built_executable JSON NAME KIND: the path of the target NAME of kind KIND
# (bin, bench) in cargo's --message-format=json output.
built_executable() {
    grep -F "\"kind\":[\"$3\"]" <<<"$1" | grep -F "\"name\":\"$2\"" |
        grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4
}

# alive PID: the process runs and is not a zombie (an exited child that was
# not reaped yet still answers `kill -0`).
alive() {
    local s
    s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$s" ] && [ "$s" != Z ]
}

# wait_port PORT [PID] [TRIES]: waits until 127.0.0.1:PORT accepts, up to
# TRIES (100) × 0.1 s; gives up at once when PID is given and has died.
wait_port() {
    for _ in $(seq "${3:-100}"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        [ -z "${2:-}" ] || alive "$2" || return 1
        sleep 0.1
    done
    return 1
}
