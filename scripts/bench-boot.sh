#!/usr/bin/env bash
# Cold-boot benchmark of one plain vmrig node (no boot snapshot), three measurements:
#
#  1. hyperfine: the whole `vmrig run` of a banner-only test (boot, `succeed("true")`,
#     shut down), RUNS runs after one warm-up run.
#  2. Over RUNS more runs of a second test: when the backdoor banner came ("connected to
#     guest root shell (X s after QEMU started)", from vmrig's log) and when systemd
#     reached multi-user.target (the guest's own timestamp, moved onto the same clock),
#     as min / median / max.
#  3. The `succeed("true")` round trip: median (and min, p90) of RTT_LOOPS calls in one
#     booted VM, timed in the test script with Python's time.monotonic().
#
# Usage (from the repository root, after `cargo build --release -p vmrig`):
#   scripts/bench-boot.sh                 # RUNS=5 RTT_LOOPS=200
#   RUNS=10 scripts/bench-boot.sh
#   VMRIG=./target/debug/vmrig VMRIG_QEMU=/path/to/qemu-system-x86_64 scripts/bench-boot.sh
#   VMRIG_ARGS="--accel tcg" scripts/bench-boot.sh     # extra `vmrig run` options
#
# Boot times under TCG depend on what else the host runs: the load average is printed
# before and after; compare numbers taken on a quiet host.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
RTT_LOOPS=${RTT_LOOPS:-200}
VMRIG=${VMRIG:-./target/release/vmrig}
read -r -a EXTRA <<<"${VMRIG_ARGS:-}"

if [[ ! -x $VMRIG ]]; then
    echo "bench-boot: $VMRIG not found; run: cargo build --release -p vmrig" >&2
    exit 2
fi
command -v hyperfine >/dev/null || { echo "bench-boot: hyperfine is not installed" >&2; exit 2; }
VMRIG=$(realpath "$VMRIG")

work=$(mktemp -d "${TMPDIR:-/tmp}/vmrig-bench-boot.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The node both tests share (so they share one image): nothing but vmrig's base image.
node='[nodes.machine]
snapshot = false
'

cat >"$work/banner.toml" <<EOF
# Banner only: start the VM, run one command, stop.
name = "bench-boot-banner"
test_script = '''
machine.succeed("true")
'''

$node
EOF

cat >"$work/boot.toml" <<EOF
# Boot milestones and the command round trip.
name = "bench-boot"
test_script = '''
import time
machine.succeed("true")
# Guest clock (seconds since the kernel started) right after the banner, and the guest
# clock when multi-user.target became active: the shell script puts both on the host's
# "seconds since QEMU started" clock with the banner time from vmrig's log.
up = float(machine.succeed("cut -d' ' -f1 /proc/uptime"))
machine.wait_for_unit("multi-user.target")
mu = int(machine.succeed("systemctl show -p ActiveEnterTimestampMonotonic --value multi-user.target")) / 1e6
state = machine.succeed("systemctl is-system-running --wait || true").strip()
rtt = []
for _ in range($RTT_LOOPS):
    t = time.monotonic()
    machine.succeed("true")
    rtt.append(time.monotonic() - t)
rtt.sort()
n = len(rtt)
print("BENCH uptime_after_banner=%.3f multi_user_guest=%.3f state=%s rtt_min_ms=%.1f rtt_median_ms=%.1f rtt_p90_ms=%.1f" % (
    up, mu, state, rtt[0] * 1e3, rtt[n // 2] * 1e3, rtt[(n * 9) // 10] * 1e3))
'''

$node
EOF

run() { "$VMRIG" run --rerun "${EXTRA[@]}" -o "$work/out" "$@"; }

echo "== host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $($VMRIG --version)"
echo "== building (or finding) the images"
"$VMRIG" build "$work/banner.toml" >/dev/null

echo
echo "== 1. hyperfine: vmrig run of a banner-only test ($RUNS runs)"
hyperfine --warmup 1 --runs "$RUNS" --style basic \
    "$VMRIG run --rerun ${EXTRA[*]} -o $work/out $work/banner.toml"

echo
echo "== 2. boot milestones, seconds after QEMU started ($RUNS runs)"
banners=() mus=() rtts=()
for i in $(seq 1 "$RUNS"); do
    log="$work/boot-$i.log"
    if ! run "$work/boot.toml" >"$log" 2>&1; then
        echo "run $i failed; its log:" >&2
        tail -30 "$log" >&2
        exit 1
    fi
    banner=$(grep -o 'connected to guest root shell ([0-9.]* s after QEMU started)' "$log" |
        grep -o '[0-9][0-9.]*' | head -1)
    bench=$(grep -o 'BENCH .*' "$log" | head -1)
    val() { sed -n "s/.*$1=\\([^ ]*\\).*/\\1/p" <<<"$bench"; }
    # Kernel start on the host clock: the banner time minus the guest's uptime then (the
    # uptime was read one round trip after the banner; that error is ~50 ms).
    mu=$(awk -v b="$banner" -v u="$(val uptime_after_banner)" -v m="$(val multi_user_guest)" \
        'BEGIN { printf "%.2f", b - u + m }')
    banners+=("$banner") mus+=("$mu") rtts+=("$(val rtt_median_ms)")
    printf '  run %d: banner %6.2f s   multi-user.target %6.2f s   %s   succeed("true") median %s ms\n' \
        "$i" "$banner" "$mu" "$(val state)" "$(val rtt_median_ms)"
done

stats() { # min median max of the arguments
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "min %7.2f   median %7.2f   max %7.2f", v[1], m, v[NR] }'
}
echo
echo "== summary ($RUNS runs; load average now $(cut -d' ' -f1-3 /proc/loadavg))"
echo "  banner (backdoor shell up), s after QEMU start:   $(stats "${banners[@]}")"
echo "  multi-user.target reached, s after QEMU start:    $(stats "${mus[@]}")"
echo "  succeed(\"true\") round trip, median of $RTT_LOOPS, ms:     $(stats "${rtts[@]}")"
