#!/usr/bin/env bash
# `make test`'s runner: builds every test target of the workspace once, then runs the test
# binaries side by side instead of one after another (as `cargo test` does).
#
# Why: most guest-tier binaries run one VM at a time, and `cargo test` runs binaries in
# sequence, so on a 2-core host one core idled through most of the guest tier. The guest
# tests share host-wide VM slots (tests/common/vm_slots.rs: one per core), so running the
# binaries together keeps every core busy without oversubscribing it.
#
# Each binary's output goes to its own log, printed whole when the binary ends (so logs do
# not interleave), then a table of every binary's wall time. A binary still running after
# PODVISOR_TEST_BINARY_TIMEOUT seconds (default 3000) gets its process tree and threads
# printed and is killed, so a hang is reported before CI's own time limit.
# Arguments are passed to every test binary (e.g. --test-threads=8).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
limit=${PODVISOR_TEST_BINARY_TIMEOUT:-3000}
work=$(mktemp -d "${TMPDIR:-/tmp}/podvisor-test-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
stamp() { date -u '+%H:%M:%S'; }
t0=$(date +%s)

echo "run-tests: $(stamp) building the test targets"
if ! $CARGO test --workspace --no-run --message-format=json-render-diagnostics \
        > "$work/build.json"; then
    echo "run-tests: building the tests failed"
    exit 1
fi

# One line per test binary: executable<TAB>package dir (cargo runs tests in the package
# dir). Integration tests of the root package first: the long guest tests then ask for VM
# slots first.
grep '"reason":"compiler-artifact"' "$work/build.json" | grep '"executable":"/' \
    | while read -r line; do
    # Test harnesses have a test profile; the plain binaries built for the tests do not.
    grep -o '"profile":{[^}]*}' <<<"$line" | grep -q '"test":true' || continue
    exe=$(grep -o '"executable":"[^"]*"' <<<"$line" | cut -d'"' -f4)
    manifest=$(grep -o '"manifest_path":"[^"]*"' <<<"$line" | cut -d'"' -f4)
    kind=$(grep -o '"kind":\["[^"]*"' <<<"$line" | head -1 | cut -d'"' -f4)
    order=1
    [ "$kind" = test ] && order=0
    printf '%s\t%s\t%s\n' "$order" "$exe" "$(dirname "$manifest")"
done | sort -s -k1,1 | cut -f2- > "$work/binaries"

count=$(wc -l < "$work/binaries")
[ "$count" -gt 0 ] || { echo "run-tests: no test binaries found"; exit 1; }
echo "run-tests: $(stamp) running $count test binaries side by side"

declare -A pid_of start_of dir_of
names=()
# Each binary runs in a process group of its own (setsid): an interrupted run kills them.
stop_all() {
    local p
    for p in "${pid_of[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
    exit 130
}
trap stop_all INT TERM
while IFS=$'\t' read -r exe dir; do
    name=$(basename "$exe")
    name=${name%-*}
    # Two targets may share a name (a crate's lib and bin unit tests): keep both.
    while [ -n "${pid_of[$name]:-}" ]; do name="$name+"; done
    names+=("$name")
    dir_of[$name]=$dir
    start_of[$name]=$(date +%s)
    ( cd "$dir" && exec setsid "$exe" "$@" ) > "$work/$name.log" 2>&1 &
    pid_of[$name]=$!
done < "$work/binaries"

# The doc tests are not in the binaries above.
( $CARGO test --workspace --doc -- "$@" > "$work/doctests.log" 2>&1 ) &
doc_pid=$!

dump() {        # dump NAME: the process tree and threads of a hung test binary
    local pid=${pid_of[$1]}
    echo "----- run-tests: $1 (pid $pid) still running after ${limit}s: its processes -----"
    ps -e -o pid,ppid,pgid,stat,etime,time,args --forest | awk -v g="$pid" 'NR==1 || $3==g'
    local p t
    for p in $(ps -e -o pid= -o pgid= | awk -v g="$pid" '$2==g {print $1}'); do
        for t in /proc/"$p"/task/*; do
            printf '%s tid %s %s state %s wchan %s syscall %s\n' "$p" "${t##*/}" \
                "$(cat "$t/comm" 2>/dev/null)" "$(awk '{print $3}' "$t/stat" 2>/dev/null)" \
                "$(cat "$t/wchan" 2>/dev/null)" "$(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
        done
    done
}

declare -A rc_of end_of
failed=()
left=${#names[@]}
while [ "$left" -gt 0 ]; do
    sleep 2
    for name in "${names[@]}"; do
        [ -n "${rc_of[$name]:-}" ] && continue
        pid=${pid_of[$name]}
        if kill -0 "$pid" 2>/dev/null; then
            if [ $(( $(date +%s) - ${start_of[$name]} )) -gt "$limit" ]; then
                dump "$name"
                kill -KILL -- "-$pid" 2>/dev/null
            fi
            continue
        fi
        wait "$pid"
        rc=$?
        rc_of[$name]=$rc
        end_of[$name]=$(date +%s)
        left=$((left - 1))
        echo "===== $(stamp) ${name} (${dir_of[$name]#"$PWD"}): exit $rc after $(( end_of[$name] - start_of[$name] )) s ====="
        cat "$work/$name.log"
        [ "$rc" = 0 ] || failed+=("$name")
    done
done
wait "$doc_pid"
doc_rc=$?
echo "===== $(stamp) doc tests: exit $doc_rc ====="
cat "$work/doctests.log"
[ "$doc_rc" = 0 ] || failed+=(doctests)

echo
echo "run-tests: wall time per test binary (they ran side by side)"
for name in "${names[@]}"; do
    printf '  %-28s %6s s  exit %s\n' "$name" "$(( end_of[$name] - start_of[$name] ))" "${rc_of[$name]}"
done
echo "run-tests: $(stamp) all done in $(( $(date +%s) - t0 )) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "run-tests: FAILED: ${failed[*]}"
    exit 1
fi
echo "run-tests: every test binary passed"
