#!/usr/bin/env bash
# Fuzzes every parser of guest- or QEMU-controlled bytes (the cargo-fuzz targets in fuzz/),
# one target after another, each for a bounded time, then prints a table: target,
# executions, exec/s, corpus size, crashes found.
#
# Usage (from anywhere in the repository):
#   scripts/fuzz.sh                    # 60 s per target, every target
#   scripts/fuzz.sh 300                # 5 min per target
#   scripts/fuzz.sh 120 qmp_reply      # some targets only
#
# Needs a nightly toolchain (FUZZ_TOOLCHAIN, default `nightly`); installs cargo-fuzz from
# crates.io when it is missing. Each target runs as one libFuzzer job (-jobs=1, one core).
# New corpus entries go to fuzz/corpus/<target>/ (git-ignored; the committed seeds are the
# `seed-*` files there), crashes to fuzz/artifacts/<target>/. Reproduce a crash with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# Exit status: 1 if any target found a crash, 0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_DIR=$ROOT/fuzz
SECS=${1:-60}
shift || true
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}

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
    echo "fuzz.sh: $t for ${SECS}s" >&2
    # libFuzzer writes the job's output to fuzz-0.log in the working directory.
    rm -f "$work/fuzz-0.log"
    (cd "$work" && cargo "+$TOOLCHAIN" fuzz run --fuzz-dir "$FUZZ_DIR" "$t" -- \
        -jobs=1 -workers=1 -max_total_time="$SECS" -timeout=20 -print_final_stats=1 \
        "${dict[@]}") >"$work/$t.out" 2>&1 || true
    log=$work/fuzz-0.log
    [[ -f $log ]] || log=$work/$t.out
    cp "$log" "$FUZZ_DIR/artifacts/$t/last-run.log"
    execs=$(stat "$log" number_of_executed_units)
    eps=$(stat "$log" average_exec_per_sec)
    corpus=$(find "$FUZZ_DIR/corpus/$t" -type f | wc -l)
    mapfile -t new < <(find "$FUZZ_DIR/artifacts/$t" -type f ! -name last-run.log \
        -newer "$work/start")
    if ! grep -q "^stat::number_of_executed_units" "$log" && ((${#new[@]} == 0)); then
        echo "fuzz.sh: $t did not finish normally, see $FUZZ_DIR/artifacts/$t/last-run.log" >&2
        new=("(no artifact; see last-run.log)")
    fi
    rows+=("$(printf '%-16s %12s %9s %8s %8s' "$t" "$execs" "$eps" "$corpus" "${#new[@]}")")
    for f in "${new[@]}"; do
        found+=("$t: $f")
    done
done

echo
printf '%-16s %12s %9s %8s %8s\n' target executions exec/s corpus crashes
printf '%s\n' "${rows[@]}"
if ((${#found[@]} > 0)); then
    echo
    echo "crashes (reproduce: cargo +$TOOLCHAIN fuzz run <target> <file>):"
    printf '  %s\n' "${found[@]}"
    exit 1
fi
