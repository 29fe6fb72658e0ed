#!/usr/bin/env bash
# Network benchmarks: the switch alone (synthetic frames on one core, cargo bench) and
# TCP throughput between two VMs through it (iperf3, under TCG on hosts without KVM).
# Usage: scripts/bench-net.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== switch alone (crates/vmrig-net/benches/switch.rs)"
cargo bench -q -p vmrig-net 2>/dev/null | grep -E "frames/s|MB/s|^[a-z]" || true

echo "== two VMs, iperf3 through the switch"
cargo build -q --release -p vmrig
./target/release/vmrig run benches/net-throughput.toml --rerun 2>&1 | grep -E "vmrig-bench|passed|FAILED"
