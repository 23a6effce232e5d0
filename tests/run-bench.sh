#!/usr/bin/env bash
# `make bench`: speed and memory figures, each beside a peer measured in the
# same run where one exists. Figures only: nothing here passes or fails on a
# number.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${HUSK_BENCH_RUNS:-20}

echo "=== built-in VMM: boot timings and memory overhead"
cargo run -q --release -p husk-vmm --example boot_bench -- "$HUSK_KERNEL" "$HUSK_INITRD" "$runs"

echo
echo "=== built-in VMM: pre-booted template, VMs restored from one snapshot beside VMs that boot their own guest (payload guest, same run)"
cargo run -q --release -p husk-vmm --example template_bench -- "${TEMPLATE_CLONES:-10}"

echo
echo "=== devices (vsock, virtio-fs) over vhost-user in qemu, beside vhost-device-vsock and the host file system"
peer_root=${HUSK_CACHE_DIR:-/var/cache/husk}/peers
peer=$peer_root/bin/vhost-device-vsock
if [ ! -x "$peer" ]; then
  echo "installing the vsock peer vhost-device-vsock 0.3.0 from crates.io into $peer_root (once)"
  cargo install -q --locked vhost-device-vsock@0.3.0 --root "$peer_root" || echo "could not install vhost-device-vsock; the vsock peer will be missing"
fi
guest_bin=target/x86_64-unknown-linux-gnu/guest
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --profile guest -p husk-agent -p husk-guest-probe --target x86_64-unknown-linux-gnu
bench_dir=$(mktemp -d /tmp/husk-bench.XXXXXX)
trap 'rm -rf "$bench_dir"' EXIT
python3 rootfs-image/mkinitramfs.py "$guest_bin/husk-agent" "$bench_dir/bench-initrd.gz" --busybox /bin/busybox \
  --add "$guest_bin/husk-guest-probe:/bench/husk-guest-probe" \
  --add tests/bench/fs-ops.sh:/bench/fs-ops.sh --add tests/bench/guest-run.sh:/bench/run >/dev/null
cargo run -q --release -p husk-tests --example device_bench -- "$HUSK_BZIMAGE" "$bench_dir/bench-initrd.gz" "$bench_dir/work" "$peer"

echo
echo "=== agent: boot to Check, container create+start, exec, stdio throughput (qemu guest, our devices)"
cargo run -q --release -p husk-tests --example agent_bench

echo
echo "=== OCI runtime: create+start+wait of /bin/true, husk-runc vs runc (100 runs each)"
cargo build -q --release -p husk-runtime --bins
./target/release/husk-runtime-bench 100

echo
echo "=== containerd: ctr run --rm of /bin/true and host memory per pod, husk beside runc (private containerd)"
tests/bench/ctr-run.sh

echo
echo "=== density: N idle pods per runtime, PSS of each pod's host processes and MemAvailable drop, husk (with and without free page reporting) beside runc (private containerd)"
tests/bench/density.sh

echo
echo "=== CRI: RunPodSandbox → ready, pod start → first output, pod TCP throughput and latency, husk beside runc (private containerd, CNI bridge)"
cargo run -q --release -p husk-tests --example cri_bench
