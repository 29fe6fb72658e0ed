# Sourced by the bench scripts: checks that $VMRIG (default ./target/release/vmrig) and
# hyperfine are there, and makes VMRIG absolute.
VMRIG=${VMRIG:-./target/release/vmrig}
if [[ ! -x $VMRIG ]]; then
    echo "bench: $VMRIG not found; run: cargo build --release -p vmrig" >&2
    exit 2
fi
command -v hyperfine >/dev/null || {
    echo "bench: hyperfine is not installed (apt-get install hyperfine)" >&2
    exit 2
}
VMRIG=$(realpath "$VMRIG")
