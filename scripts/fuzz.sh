#!/usr/bin/env bash
# Fuzzes every parser of guest- or QEMU-controlled bytes (the cargo-fuzz targets in fuzz/),
# one target after another, each until a time or an execution limit, then prints a table:
# target, executions, exec/s, corpus size, crashes found, wall time.
#
# Usage (from anywhere in the repository):
#   scripts/fuzz.sh                    # 60 s per target, every target
#   scripts/fuzz.sh 300                # 5 min per target
#   scripts/fuzz.sh 120 qmp_reply      # some targets only
#   scripts/fuzz.sh --runs 100000 600  # each target until 100,000 executions or 10 min
#   scripts/fuzz.sh --campaign         # = --runs 10000000 900: 10 million executions or
#                                      #   15 min per target, whichever comes first
#
# The campaign (about 1.5 h for the 7 targets on 2 cores), in the background, at the lowest
# priority on a shared host, with its log to poll:
#   nice -n 19 scripts/fuzz.sh --campaign >fuzz-campaign.log 2>&1 &
#   tail -f fuzz-campaign.log          # one "fuzz.sh: <target> ..." line per target, then the table
#
# Needs a nightly toolchain (FUZZ_TOOLCHAIN, default `nightly`); installs cargo-fuzz from
# crates.io when it is missing. Each target runs as one libFuzzer job (-jobs=1, one core;
# libFuzzer's -runs= and -max_total_time= are the two limits). Build output goes to
# fuzz/target (or CARGO_TARGET_DIR). New corpus entries go to fuzz/corpus/<target>/
# (git-ignored; the committed seeds are the `seed-*` files there), crashes to
# fuzz/artifacts/<target>/, each target's libFuzzer log to fuzz/artifacts/<target>/last-run.log.
# Reproduce a crash with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# Exit status: 1 if any target found a crash, 0 otherwise.
#
# Speed: fuzz builds (`--cfg fuzzing`) use smaller size bounds in vmrig-vm (QMP line 64 KiB,
# command output 64 KiB) so that inputs reach them cheaply; see fuzz/src/lib.rs for how the
# harness keeps long runs of bytes cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_DIR=$ROOT/fuzz
RUNS=-1
while (($# > 0)); do
    case $1 in
    --runs)
        RUNS=${2:-}
        shift 2 || { echo "fuzz.sh: --runs needs a number" >&2; exit 2; }
        ;;
    --campaign)
        RUNS=10000000
        set -- 900 "${@:2}"
        break
        ;;
    *) break ;;
    esac
done
SECS=${1:-60}
shift || true
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}

if ! [[ $RUNS =~ ^(-1|[0-9]+)$ ]] || ((RUNS == 0)); then
    echo "fuzz.sh: --runs must be a positive integer, not '$RUNS'" >&2
    exit 2
fi

if ! [[ $SECS =~ ^[0-9]+$ ]] || ((SECS < 1)); then
    echo "fuzz.sh: seconds per target must be a positive integer, not '$SECS'" >&2
    exit 2
fi
if ! cargo "+$TOOLCHAIN" --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the $TOOLCHAIN toolchain: rustup toolchain install $TOOLCHAIN" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$TOOLCHAIN" fuzz list --fuzz-dir "$FUZZ_DIR")
fi

echo "fuzz.sh: building the fuzz targets" >&2
cargo "+$TOOLCHAIN" fuzz build --fuzz-dir "$FUZZ_DIR" >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/vmrig-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The value of a `stat::<name>:` line of libFuzzer's final stats, else from its last
# status line (`#N ... exec/s: M ...`, when the job ended on a crash).
stat() {
    local log=$1 name=$2 v
    v=$(sed -n "s/^stat::$name: *\([0-9]*\).*/\1/p" "$log" | tail -n 1)
    if [[ -z $v ]]; then
        case $name in
        number_of_executed_units) v=$(sed -n 's/^#\([0-9][0-9]*\)\s.*/\1/p' "$log" | tail -n 1) ;;
        average_exec_per_sec) v=$(sed -n 's/^#[0-9].*exec\/s: \([0-9]*\).*/\1/p' "$log" | tail -n 1) ;;
        esac
    fi
    echo "${v:-?}"
}

rows=()
found=()
for t in "${targets[@]}"; do
    mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
    touch "$work/start"
    dict=()
    [[ -f $FUZZ_DIR/dicts/$t.dict ]] && dict=("-dict=$FUZZ_DIR/dicts/$t.dict")
    limit="${SECS}s"
    ((RUNS > 0)) && limit="$RUNS executions or ${SECS}s"
    echo "fuzz.sh: $t for $limit ($(date +%H:%M:%S))" >&2
    # libFuzzer writes the job's output to fuzz-0.log in the working directory.
    rm -f "$work/fuzz-0.log"
    began=$SECONDS
    (cd "$work" && cargo "+$TOOLCHAIN" fuzz run --fuzz-dir "$FUZZ_DIR" "$t" -- \
        -jobs=1 -workers=1 -runs="$RUNS" -max_total_time="$SECS" -timeout=20 \
        -print_final_stats=1 "${dict[@]}") >"$work/$t.out" 2>&1 || true
    wall=$((SECONDS - began))
    log=$work/fuzz-0.log
    [[ -f $log ]] || log=$work/$t.out
    cp "$log" "$FUZZ_DIR/artifacts/$t/last-run.log"
    execs=$(stat "$log" number_of_executed_units)
    eps=$(stat "$log" average_exec_per_sec)
    # libFuzzer divides by whole seconds: 0 when the runs took less than one.
    [[ $eps == 0 && $execs =~ ^[1-9] ]] && eps=">$execs"
    corpus=$(find "$FUZZ_DIR/corpus/$t" -type f | wc -l)
    mapfile -t new < <(find "$FUZZ_DIR/artifacts/$t" -type f ! -name last-run.log \
        -newer "$work/start")
    if ! grep -q "^stat::number_of_executed_units" "$log" && ((${#new[@]} == 0)); then
        echo "fuzz.sh: $t did not finish normally, see $FUZZ_DIR/artifacts/$t/last-run.log" >&2
        new=("(no artifact; see last-run.log)")
    fi
    rows+=("$(printf '%-16s %12s %9s %8s %8s %8s' "$t" "$execs" "$eps" "$corpus" "${#new[@]}" \
        "${wall}s")")
    echo "fuzz.sh: $t: $execs executions, $eps exec/s, ${#new[@]} crashes, ${wall}s" >&2
    for f in "${new[@]}"; do
        found+=("$t: $f")
    done
done

echo
printf '%-16s %12s %9s %8s %8s %8s\n' target executions exec/s corpus crashes wall
printf '%s\n' "${rows[@]}"
if ((${#found[@]} > 0)); then
    echo
    echo "crashes (reproduce: cargo +$TOOLCHAIN fuzz run <target> <file>):"
    printf '  %s\n' "${found[@]}"
    exit 1
fi
