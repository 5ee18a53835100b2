#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what a fresh machine lacks
# (Debian packages, cargo-fuzz), then runs formatting, lints, unit and
# integration tests, each fuzz target for a few seconds, the packaging checks
# and the benchmark smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# promtool and the Prometheus server (the metrics tests scrape berth for real).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# systemd-analyze verifies the systemd unit (scripts/check-packaging.sh);
# groff checks the man page that `berth manpage` renders (tests/cli.rs).
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# verify opens the unit's Documentation=man:berth(1) with man.
command -v man >/dev/null 2>&1 || need_apt+=(man-db)
command -v groff >/dev/null 2>&1 || need_apt+=(groff-base)
# Headless Chromium and its WebDriver: the status page tests
# (tests/status_page.rs, tests/support/browser.rs).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing: ${need_apt[*]}"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian package starts a Prometheus service on :9090 where systemd runs;
# the tests start their own on a free port, so that one is not needed.

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "==> cargo test"
cargo test --all-targets 2>&1 | tee target/test-output.txt
echo "==> fuzz targets, 5 s each (a broken target is noticed; scripts/fuzz.sh runs the long campaigns)"
# The fuzz crate builds on the nightly toolchain with cargo-fuzz; a quicker
# unoptimized build is enough for a few seconds per target.
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
FUZZ_TIME=5 FUZZ_BUILD=--dev FUZZ_CORPUS="$PWD/target/fuzz-corpus" FUZZ_LOG_DIR="$PWD/target/fuzz-logs" \
    ./scripts/fuzz.sh
echo "==> packaging (systemd unit, Dockerfile)"
./scripts/check-packaging.sh target/debug/berth
echo "==> Kubernetes manifests (API schemas, the ConfigMap's config)"
./scripts/check-kubernetes.sh target/debug/berth
echo "==> benchmark smoke test (loadgen + echo backend, direct and through berth)"
./benches/smoke.sh 2>&1 | tee -a target/test-output.txt
# A plain summary line that CI reads across test binaries.
passed=$(grep -Eo 'test result: [a-z]+\. [0-9]+ passed' target/test-output.txt | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
echo "${passed} passed, ${failed} failed"
