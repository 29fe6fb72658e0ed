#!/usr/bin/env bash
# The image work after a change to a local .deb (issue 16 item 1), with hyperfine:
#
#   cold:    the node's root image from nothing (base tree by mmdebstrap + the layer that
#            installs the .deb): what every .deb change would cost without the layer
#   layered: the base tree cached, the .deb rebuilt with new content: only the layer
#            (unpack the base, apt-get install ./x.deb and its dependency, mke2fs)
#
# One node (examples/deb-daemon's package, which pulls socat from the archive), in a
# private store that starts with the shared store's kernel and initramfs (hard links), so
# neither is part of either number. Each layered run first rebuilds the .deb with a new
# file in it (`--prepare`).
#
# Usage (from anywhere, after `cargo build --release -p vmrig`; takes a few minutes):
#   benches/deb-layer.sh                 # COLD_RUNS=2 LAYERED_RUNS=5
#   VMRIG=./target/debug/vmrig COLD_RUNS=1 benches/deb-layer.sh
#   COLD_RUNS=0 LAYERED_RUNS=10 benches/deb-layer.sh   # the layer only (base built once)
set -euo pipefail
cd "$(dirname "$0")/.."

COLD_RUNS=${COLD_RUNS:-2}
LAYERED_RUNS=${LAYERED_RUNS:-5}
source benches/preflight.sh # (the working directory is the repository now)
work=$(mktemp -d "${TMPDIR:-/tmp}/vmrig-bench-deb.XXXXXX")
# The store's trees may belong to subordinate ids (a build as a normal user).
trap 'unshare --map-root-user --map-auto rm -rf "$work" 2>/dev/null || rm -rf "$work"' EXIT

# The package source, copied: each layered run changes it.
cp -a examples/deb-daemon/hello-daemon "$work/src"
cat >"$work/rebuild-deb.sh" <<EOF
date +%s.%N >"$work/src/usr/lib/hello-daemon/build-stamp"
dpkg-deb --build --root-owner-group "$work/src" "$work/hello-daemon.deb" >/dev/null
EOF
sh "$work/rebuild-deb.sh"
cat >"$work/deb-layer.toml" <<'EOF'
name = "deb-layer"
test_script = "start_all()"

[nodes.server]
packages = ["./hello-daemon.deb"]
EOF

# A private store with the shared store's kernel and initramfs in it (built first if
# needed).
paths=$("$VMRIG" build "$work/deb-layer.toml")
shared=$(sed -n 's|^ *kernel *\(.*\)/vmlinuz$|\1|p' <<<"$paths")
shared_initrd=$(sed -n 's|^ *initrd *\(.*\)/initrd$|\1|p' <<<"$paths")
export VMRIG_STORE="$work/store"
mkdir -p "$VMRIG_STORE"
cp -al "$shared" "$shared_initrd" "$VMRIG_STORE/"

echo "== host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $($VMRIG --version)"
build="$VMRIG build $work/deb-layer.toml"
: >"$work/cold.md"
if ((COLD_RUNS > 0)); then
    hyperfine --runs "$COLD_RUNS" --export-markdown "$work/cold.md" \
        --prepare "rm -rf $VMRIG_STORE/*-rootfs-*" \
        -n cold "$build"
else
    # The base, once (not timed).
    $build >/dev/null
fi
hyperfine --runs "$LAYERED_RUNS" --export-markdown "$work/layered.md" \
    --prepare "sh $work/rebuild-deb.sh" \
    -n layered "$build"
cat "$work/cold.md" "$work/layered.md"
