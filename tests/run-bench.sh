#!/usr/bin/env bash
# `make bench`: speed and memory figures, each beside a peer measured in the
# same run where one exists. Figures only: nothing here passes or fails on a
# number.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${HUSK_BENCH_RUNS:-20}

echo "=== built-in VMM: boot timings and memory overhead"
cargo run -q --release -p husk-vmm --example boot_bench -- "$HUSK_KERNEL" "$HUSK_INITRD" "$runs"

if [ -f runtime/Cargo.toml ] && grep -q 'husk-runtime-bench' runtime/Cargo.toml 2>/dev/null; then
  echo
  echo "=== OCI runtime: create+start+wait of /bin/true, husk-runc vs runc"
  cargo run -q --release -p husk-runtime --bin husk-runtime-bench
else
  echo
  echo "=== OCI runtime: not measured (the runtime crate has no bench yet)"
fi
