#!/usr/bin/env bash
# Runs berth's cargo-fuzz targets one after another and prints a summary
# (executions, time, exec/s, corpus, coverage) per target. A crash stops the
# script with exit status 1 and names the input it saved under
# fuzz/artifacts/TARGET/; turn it into a unit test in berth (see README,
# "Fuzzing").
#
#   scripts/fuzz.sh                       # every target, 10 million executions each
#   scripts/fuzz.sh relay_cuts config     # only these
#   FUZZ_TIME=5 scripts/fuzz.sh           # a few seconds each (scripts/test.sh does this)
#
# Knobs (environment):
#   FUZZ_RUNS       executions per target (default 10000000; 0 = no limit)
#   FUZZ_TIME       seconds per target (default: none; with FUZZ_RUNS unset,
#                   FUZZ_TIME alone bounds the run)
#   FUZZ_SANITIZER  none (default), address or leak: `none` runs about twice
#                   as fast as address, and berth itself has no unsafe code
#   FUZZ_BUILD      extra `cargo fuzz build` flags, e.g. --dev (a quicker
#                   build for short runs)
#   FUZZ_CORPUS     where the grown corpora live (default fuzz/corpus; one
#                   directory per target); the seeds in fuzz/seeds/TARGET are
#                   read, never written
#   FUZZ_LOG_DIR    where each target's libFuzzer log goes (default
#                   fuzz/artifacts/logs)
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# One process per target (-jobs is not used): the machine is shared.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

ALL_TARGETS=(relay_cuts relay_frames handshake config affinity target proxy_header)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${ALL_TARGETS[@]}"); fi

if [ -n "${FUZZ_TIME:-}" ] && [ -z "${FUZZ_RUNS:-}" ]; then
    runs=0
else
    runs=${FUZZ_RUNS:-10000000}
fi
sanitizer=${FUZZ_SANITIZER:-none}
corpus_root=${FUZZ_CORPUS:-corpus}
log_dir=${FUZZ_LOG_DIR:-artifacts/logs}
mkdir -p "$log_dir"
shown() { case $1 in /*) echo "$1" ;; *) echo "fuzz/$1" ;; esac; }
# shellcheck disable=SC2206
build_flags=(${FUZZ_BUILD:-})

echo "==> building the fuzz targets (sanitizer: $sanitizer)"
cargo +nightly fuzz build --sanitizer "$sanitizer" "${build_flags[@]}"

libfuzzer_args=(-print_final_stats=1 -timeout=30 -rss_limit_mb=2048)
if [ "$runs" != 0 ]; then libfuzzer_args+=("-runs=$runs"); fi
if [ -n "${FUZZ_TIME:-}" ]; then libfuzzer_args+=("-max_total_time=$FUZZ_TIME"); fi

summary=()
for t in "${targets[@]}"; do
    corpus="$corpus_root/$t"
    mkdir -p "$corpus"
    dirs=("$corpus")
    if [ -d "seeds/$t" ]; then dirs+=("seeds/$t"); fi
    log="$log_dir/$t.log"
    echo "==> fuzzing $t (${libfuzzer_args[*]}), log: $(shown "$log")"
    start=$(date +%s)
    status=0
    cargo +nightly fuzz run --sanitizer "$sanitizer" "${build_flags[@]}" "$t" "${dirs[@]}" -- \
        "${libfuzzer_args[@]}" >"$log" 2>&1 || status=$?
    secs=$(( $(date +%s) - start ))
    if [ "$status" != 0 ]; then
        grep -E "panicked|ERROR|SUMMARY|Test unit written|deadly signal" "$log" | head -20 || true
        echo "fuzz target $t FAILED after ${secs}s (exit $status); log: $(shown "$log")" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
    cov=$(sed -E -n 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")
    ft=$(sed -E -n 's/.* ft: ([0-9]+).*/\1/p' <<<"$done_line")
    files=$(find "$corpus" -type f | wc -l)
    bytes=$(du -sb "$corpus" | cut -f1)
    summary+=("$(printf '| %s | %s | %s | %s | %s files, %s bytes | %s | %s |' \
        "$t" "$execs" "$secs" "$rate" "$files" "$bytes" "$cov" "$ft")")
done

echo
echo "| target | executions | seconds | exec/s | corpus | coverage (edges) | features |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
