#!/usr/bin/env bash
# After the test suite (.ci/run calls it after nextest): fails when a test left a VM or a run
# behind. Each real-VM test checks its own runs (crates/vmrig/tests/common/mod.rs,
# `assert_no_leftovers`); this catches what those checks cannot see: a test killed by
# nextest's timeout, unit tests that start processes, a test that forgot the check.
#
# Leftovers: a live (not zombie) process that is QEMU (`qemu-system-*`), vmrig, or names a
# run directory on its command line (the script's python3, the run directory's watcher);
# a `vmrig-run-*` directory in $TMPDIR (default /tmp) or one level below (the tests' own
# temporary directories) that was not kept on purpose (`-K` leaves a `keep` file in it).
# Processes get up to 10 s to end first. Silent when nothing is left; otherwise lists the
# leftovers on stderr and exits 1.
set -uo pipefail

tmp=${TMPDIR:-/tmp}

leftover_processes() {
    local dir pid comm state cmdline
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [ "$pid" = "$$" ] && continue
        # The state is the first field after the command name in parentheses.
        state=$(sed -n 's/^.*) \([A-Za-z]\).*/\1/p' "$dir/stat" 2>/dev/null) || continue
        [ "$state" = Z ] && continue
        comm=$(cat "$dir/comm" 2>/dev/null) || continue
        cmdline=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
        case "$comm" in
        qemu-system-*|vmrig|nixos-test-driv*) ;;
        *) case "$cmdline" in *vmrig-run-*) ;; *) continue ;; esac ;;
        esac
        echo "process $pid ($comm): $cmdline"
    done
}

leftover_run_dirs() {
    local dir
    while IFS= read -r -d '' dir; do
        [ -e "$dir/keep" ] && continue
        echo "run directory $dir"
    done < <(find "$tmp" -mindepth 1 -maxdepth 2 -type d -name 'vmrig-run-*' -print0 2>/dev/null)
}

deadline=$((SECONDS + 10))
while processes=$(leftover_processes) && [ -n "$processes" ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.5
done
left=$(leftover_processes; leftover_run_dirs)
if [ -n "$left" ]; then
    {
        echo "check-leftovers: the test suite left these behind:"
        printf '%s\n' "$left" | sed 's/^/  /'
    } >&2
    exit 1
fi
