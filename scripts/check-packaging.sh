#!/usr/bin/env bash
# Checks the packaging files as far as this machine can without systemd
# running or a container runtime:
#   packaging/systemd/berth.service  `systemd-analyze verify` (any warning
#       fails), the hardening and signal settings the unit promises, and a
#       TimeoutStopSec above berth's default drain time;
#   Dockerfile  every path it copies exists in the build context (and is not
#       excluded by .dockerignore), the final stage runs as a non-root user,
#       stops with SIGTERM, starts `berth run` in exec form, exposes every
#       port its config binds, and that config passes `berth check` with the
#       files the image puts beside it.
# Then it feeds each check a broken copy and expects it to be rejected, so a
# check that cannot fail is caught here.
#
# Usage: scripts/check-packaging.sh PATH/TO/berth   (a built binary)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bin=${1:?usage: scripts/check-packaging.sh PATH/TO/berth}
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is missing (Debian package: systemd)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# berth's defaults: shutdown_window 10s plus close_timeout 5s.
default_drain_us=$(( (10 + 5) * 1000000 ))

fail() { echo "  FAIL: $*" >&2; failures=$((failures + 1)); }

# The value of KEY= in a unit file (the last assignment wins, as in systemd).
unit_value() { grep -E "^$2=" "$1" | tail -n 1 | cut -d= -f2- || true; }

check_unit() {
    local unit=$1 failures=0
    local dir
    dir=$(mktemp -d "$work/unit.XXXX")
    # verify checks that ExecStart's binary exists and that the man page in
    # Documentation= can be opened: point both at what this build produced.
    mkdir -p "$dir/man/man1"
    "$bin" manpage >"$dir/man/man1/berth.1"
    sed "s#/usr/local/bin/berth#$bin#g" "$unit" >"$dir/berth.service"
    local out
    if ! out=$(MANPATH="$dir/man" systemd-analyze verify "$dir/berth.service" 2>&1); then
        fail "systemd-analyze verify failed: $out"
    elif [ -n "$out" ]; then
        # verify exits 0 on unknown keys and unparsable values; they are
        # ignored by systemd, so the unit would silently lose them.
        fail "systemd-analyze verify warned: $out"
    fi

    [ "$(unit_value "$unit" DynamicUser)" = yes ] || [ -n "$(unit_value "$unit" User)" ] \
        || fail "neither DynamicUser=yes nor User= is set"
    [ "$(unit_value "$unit" User)" != root ] || fail "User=root"
    [[ "$(unit_value "$unit" AmbientCapabilities)" == *CAP_NET_BIND_SERVICE* ]] \
        || fail "AmbientCapabilities lacks CAP_NET_BIND_SERVICE"
    [ "$(unit_value "$unit" NoNewPrivileges)" = yes ] || fail "NoNewPrivileges is not yes"
    [ "$(unit_value "$unit" ProtectSystem)" = strict ] || fail "ProtectSystem is not strict"
    local nofile
    nofile=$(unit_value "$unit" LimitNOFILE)
    [[ "$nofile" =~ ^[0-9]+$ && "$nofile" -ge 65536 ]] || [ "$nofile" = infinity ] \
        || fail "LimitNOFILE is not raised (got '$nofile')"
    [ "$(unit_value "$unit" KillSignal)" = SIGTERM ] || fail "KillSignal is not SIGTERM"

    local stop stop_us
    stop=$(unit_value "$unit" TimeoutStopSec)
    stop_us=$(systemd-analyze timespan "$stop" 2>/dev/null | awk '/μs:/ {print $2}')
    [[ "$stop_us" =~ ^[0-9]+$ && "$stop_us" -gt "$default_drain_us" ]] \
        || fail "TimeoutStopSec '$stop' is not above shutdown_window + close_timeout (15s by default)"

    # run writes the pid file that ExecReload signals, after a check.
    local exec_start pid_file
    exec_start=$(unit_value "$unit" ExecStart)
    pid_file=$(sed -n 's/.*--pid-file[= ]\([^ ]*\).*/\1/p' <<<"$exec_start")
    [[ "$exec_start" == *" run "* ]] || fail "ExecStart does not run 'berth run'"
    [ -n "$pid_file" ] || fail "ExecStart has no --pid-file"
    local reloads
    reloads=$(grep -E '^ExecReload=' "$unit" | cut -d= -f2- || true)
    [[ "$(head -n 1 <<<"$reloads")" == *"berth check"* ]] || fail "the first ExecReload is not 'berth check'"
    [[ "$(tail -n 1 <<<"$reloads")" == *HUP*"$pid_file"* ]] \
        || fail "the last ExecReload does not send SIGHUP to the pid in ${pid_file:-the pid file}"
    return "$failures"
}

# The Dockerfile's instructions, one per line (continuations joined,
# comments dropped).
instructions() {
    sed -e '/^[[:space:]]*#/d' "$1" | sed -e ':a' -e '/\\$/N; s/\\\n//; ta' | sed -e '/^[[:space:]]*$/d'
}

# The words of an exec-form (JSON array) instruction argument, one a line;
# fails for the shell form.
exec_words() {
    local json=$1
    [[ "$json" =~ ^\[.*\]$ ]] || return 1
    json=${json#[}
    json=${json%]}
    tr ',' '\n' <<<"$json" | sed -e 's/^[[:space:]]*"//' -e 's/"[[:space:]]*$//'
}

check_dockerfile() {
    local dockerfile=$1 context=$2 failures=0
    local ignore=()
    if [ -f "$context/.dockerignore" ]; then
        while IFS= read -r pat; do
            pat=${pat%/}
            [[ -z "$pat" || "$pat" == \#* ]] || ignore+=("$pat")
        done <"$context/.dockerignore"
    fi

    local lines final image_root stages stage=0
    lines=$(instructions "$dockerfile")
    stages=$(grep -ci '^FROM[[:space:]]' <<<"$lines" || true)
    # The final stage: everything after the last FROM.
    final=$(awk 'toupper($1) == "FROM" {buf = ""} {buf = buf $0 "\n"} END {printf "%s", buf}' <<<"$lines")
    image_root=$(mktemp -d "$work/image.XXXX")

    # Every COPY from the build context: the sources exist and are sent.
    while read -r instr rest; do
        [ "${instr^^}" = FROM ] && stage=$((stage + 1))
        [ "${instr^^}" = COPY ] || continue
        local words=()
        read -r -a words <<<"$rest"
        [[ "${words[*]}" == *--from=* ]] && continue
        local args=()
        for w in "${words[@]}"; do [[ "$w" == --* ]] || args+=("$w"); done
        local dest=${args[-1]}
        unset 'args[-1]'
        for src in "${args[@]}"; do
            if [ ! -e "$context/$src" ]; then
                fail "COPY source $src does not exist"
                continue
            fi
            for pat in "${ignore[@]}"; do
                # shellcheck disable=SC2053 # the pattern is a glob on purpose
                if [[ "${src%/}" == $pat || "${src%/}" == $pat/* ]]; then
                    fail "COPY source $src is excluded by .dockerignore ($pat)"
                fi
            done
        done
        # Lay out what the final stage copies, to check its config below.
        if [ "$stage" -eq "$stages" ] && [[ "$dest" == /* ]]; then
            if [[ "$dest" == */ ]]; then
                mkdir -p "$image_root$dest"
            else
                mkdir -p "$(dirname "$image_root$dest")"
            fi
            for src in "${args[@]}"; do
                [ -e "$context/$src" ] && cp -r "$context/$src" "$image_root$dest"
            done
        fi
    done <<<"$lines"

    local user
    user=$(awk 'toupper($1) == "USER" {u = $2} END {print u}' <<<"$final")
    user=${user%%:*}
    [ -n "$user" ] || fail "the final stage sets no USER (it would run as root)"
    [[ "$user" != root && "$user" != 0 ]] || fail "the final stage runs as root"
    [ "$(awk 'toupper($1) == "STOPSIGNAL" {s = $2} END {print s}' <<<"$final")" = SIGTERM ] \
        || fail "STOPSIGNAL is not SIGTERM"

    local entry cmd words=()
    entry=$(awk 'toupper($1) == "ENTRYPOINT" {$1 = ""; e = $0} END {print e}' <<<"$final" | sed 's/^ *//')
    cmd=$(awk 'toupper($1) == "CMD" {$1 = ""; c = $0} END {print c}' <<<"$final" | sed 's/^ *//')
    if exec_words "$entry" >/dev/null; then
        mapfile -t words < <(exec_words "$entry")
    else
        fail "ENTRYPOINT is not in exec form (berth must be PID 1 to receive SIGTERM): $entry"
    fi
    if [ -n "$cmd" ]; then
        if exec_words "$cmd" >/dev/null; then
            local cmd_words=()
            mapfile -t cmd_words < <(exec_words "$cmd")
            words+=("${cmd_words[@]}")
        else
            fail "CMD is not in exec form: $cmd"
        fi
    fi
    [ "$(basename "${words[0]:-}")" = berth ] && [ "${words[1]:-}" = run ] \
        || fail "the entrypoint is not 'berth run' (got: ${words[*]})"
    local config=""
    for i in "${!words[@]}"; do
        [[ "${words[$i]}" == --config || "${words[$i]}" == -c ]] && config=${words[$((i + 1))]:-}
    done
    [ "$config" = /etc/berth/berth.toml ] || fail "berth run does not read /etc/berth/berth.toml (got '$config')"

    # The image's config is valid with the files the image holds, and every
    # port it binds is exposed.
    if [ -f "$image_root/etc/berth/berth.toml" ]; then
        sed "s#/etc/berth/#$image_root/etc/berth/#g" "$image_root/etc/berth/berth.toml" >"$image_root/check.toml"
        local out
        out=$("$bin" check "$image_root/check.toml" 2>&1) || fail "the image's config is invalid: $out"
        local exposed
        exposed=" $(awk 'toupper($1) == "EXPOSE" {$1 = ""; printf "%s ", $0}' <<<"$final") "
        for port in $(sed -n 's/^bind *= *"[^"]*:\([0-9]*\)".*/\1/p' "$image_root/etc/berth/berth.toml"); do
            [[ "$exposed" == *" $port "* || "$exposed" == *" $port/tcp "* ]] \
                || fail "port $port is bound in the image's config but not exposed"
        done
    else
        fail "the final stage copies no /etc/berth/berth.toml"
    fi
    return "$failures"
}

status=0
echo "==> packaging/systemd/berth.service"
check_unit packaging/systemd/berth.service || status=1
echo "==> Dockerfile"
check_dockerfile Dockerfile "$root" || status=1

# Each check must reject a broken copy.
echo "==> the checks reject broken copies"
expect_rejected() {
    local what=$1
    shift
    local why
    if why=$("$@" 2>&1); then
        echo "  FAIL: not rejected: $what" >&2
        status=1
    else
        echo "  $what: $(grep -m 1 'FAIL' <<<"$why" | sed 's/^ *FAIL: //')"
    fi
}
broken=$work/broken
mkdir -p "$broken"
sed 's/^NoNewPrivileges=yes/NoNewPrivilege=yes/' packaging/systemd/berth.service >"$broken/typo.service"
expect_rejected "a misspelt unit key" check_unit "$broken/typo.service"
sed 's/^TimeoutStopSec=.*/TimeoutStopSec=10s/' packaging/systemd/berth.service >"$broken/short.service"
expect_rejected "TimeoutStopSec below the drain time" check_unit "$broken/short.service"
sed '/^ExecReload=.*berth check/d' packaging/systemd/berth.service >"$broken/nocheck.service"
expect_rejected "an ExecReload without berth check" check_unit "$broken/nocheck.service"
sed 's/^USER .*/USER root/' Dockerfile >"$broken/Dockerfile.root"
expect_rejected "a root USER" check_dockerfile "$broken/Dockerfile.root" "$root"
sed 's#^COPY certs/example.crt#COPY certs/missing.crt#' Dockerfile >"$broken/Dockerfile.missing"
expect_rejected "a COPY of a missing file" check_dockerfile "$broken/Dockerfile.missing" "$root"
sed 's#^ENTRYPOINT .*#ENTRYPOINT /usr/local/bin/berth#' Dockerfile >"$broken/Dockerfile.shell"
expect_rejected "a shell-form ENTRYPOINT" check_dockerfile "$broken/Dockerfile.shell" "$root"
sed 's/^EXPOSE .*/EXPOSE 8080 8443/' Dockerfile >"$broken/Dockerfile.ports"
expect_rejected "an unexposed admin port" check_dockerfile "$broken/Dockerfile.ports" "$root"

if [ "$status" -eq 0 ]; then
    echo "packaging: ok"
else
    echo "packaging: FAILED" >&2
fi
exit "$status"
