#!/usr/bin/env bash
# vmrig's speed benchmarks, each cold and warm, with hyperfine; prints a table.
#
#   (a) one VM: multi-user.target, then 50 succeed("true")        benches/one-vm.toml
#   (b) the two-node nginx client/server test                      examples/client-server.toml
#   (c) (b) plus block, a failing curl, unblock                     benches/block-curl.toml
#   (d) (b) under `vmrig nixos-driver`, on the start scripts `vmrig build --start-scripts`
#       writes for it (the NixOS driver's command line: --start-scripts, --vlans)
#   boot to banner (cold boot, no snapshot) and the succeed("true") round trip alone.
#
# cold: the images are built, the boot snapshots are not: every run first removes the
#       store's snapshots (`vmrig store gc --all --snapshots`), so it boots cold and saves
#       new ones; for (d) every run boots without them (`--no-snapshots`), which removes
#       nothing. warm: the snapshots exist (each run restores them).
# Every run uses --rerun (the result cache is not used).
#
# Usage (from anywhere, after `cargo build --release -p vmrig`):
#   benches/bench.sh                    # COLD_RUNS=3 WARM_RUNS=5
#   COLD_RUNS=1 WARM_RUNS=3 benches/bench.sh
#   VMRIG=./target/debug/vmrig benches/bench.sh
#   BENCHES="b d" WARM_ONLY=1 benches/bench.sh   # some of them, without the cold runs
#       that remove the store's snapshots ((a)-(c), banner): fine on a shared store
# Numbers depend on what else the host runs: the load average is printed with the table.
# Note: the cold runs remove the boot snapshots of every test in the store (the next run
# of each node saves its snapshot again).
set -euo pipefail
cd "$(dirname "$0")/.."

COLD_RUNS=${COLD_RUNS:-3}
WARM_RUNS=${WARM_RUNS:-5}
BENCHES=${BENCHES:-a b c d}
WARM_ONLY=${WARM_ONLY:-}
source benches/preflight.sh # (the working directory is the repository now)
work=$(mktemp -d "${TMPDIR:-/tmp}/vmrig-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

run="$VMRIG run --rerun -o $work/out"
forget="$VMRIG store gc --all --snapshots"
declare -A tests=(
    [a]=benches/one-vm.toml
    [b]=examples/client-server.toml
    [c]=benches/block-curl.toml
)

echo "== host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $($VMRIG --version)"
selected() { [[ " $BENCHES " == *" $1 "* ]]; }

echo "== building (or finding) the images"
for t in a b c; do "$VMRIG" build "${tests[$t]}" >/dev/null; done
"$VMRIG" build benches/rtt.toml >/dev/null
# (d): the start scripts of (b), and its test script.
"$VMRIG" build --start-scripts "$work/scripts" examples/client-server.toml >/dev/null
python3 - "$work/client-server.py" <<'PY'
import re, sys
text = open("examples/client-server.toml").read()
open(sys.argv[1], "w").write(re.search(r"test_script = '''(.*?)'''", text, re.S).group(1))
PY
tests[d]="vmrig nixos-driver on (b)'s start scripts"
nixos="$VMRIG nixos-driver -o $work/out --start-scripts $work/scripts/run-server-vm $work/scripts/run-client-vm --vlans 1"
declare -A commands=(
    [a]="$run ${tests[a]}"
    [b]="$run ${tests[b]}"
    [c]="$run ${tests[c]}"
    [d]="$nixos -- $work/client-server.py"
)
declare -A cold_commands=(
    [d]="$nixos --no-snapshots -- $work/client-server.py"
)
mkdir -p "$work/out"

for t in a b c d; do
    selected "$t" || continue
    if [[ -n ${cold_commands[$t]:-} ]]; then
        echo "== ($t) ${tests[$t]}: cold, $COLD_RUNS runs"
        hyperfine --style basic --runs "$COLD_RUNS" \
            --export-json "$work/$t-cold.json" "${cold_commands[$t]}"
    elif [[ -z $WARM_ONLY ]]; then
        echo "== ($t) ${tests[$t]}: cold, $COLD_RUNS runs"
        hyperfine --style basic --runs "$COLD_RUNS" --prepare "$forget >/dev/null" \
            --export-json "$work/$t-cold.json" "${commands[$t]}"
    fi
    echo "== ($t) ${tests[$t]}: warm, $WARM_RUNS runs"
    hyperfine --style basic --warmup 1 --runs "$WARM_RUNS" \
        --export-json "$work/$t-warm.json" "${commands[$t]}"
done

: >"$work/banners"
: >"$work/rtt"
if selected a && [[ -z $WARM_ONLY ]]; then
    echo "== boot to banner, cold ($COLD_RUNS runs of (a))"
    for _ in $(seq 1 "$COLD_RUNS"); do
        $forget >/dev/null
        $run benches/one-vm.toml 2>&1 |
            grep -o 'connected to guest root shell ([0-9.]* s after QEMU started)' |
            grep -o '[0-9][0-9.]*' | head -1 >>"$work/banners"
    done
fi
if selected a; then
    echo "== succeed(\"true\") round trip (200 calls, one VM)"
    $run benches/rtt.toml 2>&1 | grep -o 'BENCH .*' | head -1 >"$work/rtt"
fi

python3 - "$work" "$COLD_RUNS" "$WARM_RUNS" <<'PY'
import json, os, statistics, sys
work, cold_runs, warm_runs = sys.argv[1], sys.argv[2], sys.argv[3]
def cell(path):
    if not os.path.exists(path):
        return "-"
    r = json.load(open(path))["results"][0]
    return "%6.2f s ± %4.2f" % (r["mean"], r["stddev"] or 0.0)
rows = [
    ("(a) one VM, multi-user + 50 succeed", "a"),
    ("(b) client-server (nginx, 2 nodes)", "b"),
    ("(c) (b) + block, failing curl, unblock", "c"),
    ("(d) (b) under `vmrig nixos-driver` (vmrig's start scripts)", "d"),
]
print()
print("| benchmark | cold (mean ± σ, %s runs) | warm (mean ± σ, %s runs) |" % (cold_runs, warm_runs))
print("|---|---|---|")
for name, t in rows:
    if os.path.exists(f"{work}/{t}-warm.json"):
        print("| %s | %s | %s |" % (name, cell(f"{work}/{t}-cold.json"), cell(f"{work}/{t}-warm.json")))
banners = [float(x) for x in open(f"{work}/banners").read().split()]
if banners:
    print("| boot to banner, cold (QEMU start -> backdoor) | median %.2f s (min %.2f, max %.2f) | - |"
          % (statistics.median(banners), min(banners), max(banners)))
rtt = dict(kv.split("=") for kv in open(f"{work}/rtt").read().split()[1:])
if rtt:
    print("| succeed(\"true\") round trip, 200 calls | - | median %s ms (min %s, p90 %s) |"
          % (rtt["rtt_median_ms"], rtt["rtt_min_ms"], rtt["rtt_p90_ms"]))
PY
echo "load average now $(cut -d' ' -f1-3 /proc/loadavg)"
