#!/bin/sh
# The guest side of `make bench` for the devices (run by husk-agent through
# `husk.exec=`): the file-system operations on the virtio-fs share when the
# command line says `husk.bench_fs=1`, then the vsock transfers the host
# drives (see tests/examples/device_bench.rs for the ports).
PATH=/bin
bytes=$(sed -n 's/.*husk.bench_bytes=\([0-9]*\).*/\1/p' /proc/cmdline)
if grep -q husk.bench_fs=1 /proc/cmdline; then
  mount -t virtiofs kataShared /mnt || echo "BENCH_ERROR cannot mount the virtio-fs share"
  sh /bench/fs-ops.sh /mnt 128 1000
  umount /mnt
fi
/bench/husk-guest-probe vsock-listen 6000 0 1 >/dev/null || echo "BENCH_ERROR vsock host-to-guest"
/bench/husk-guest-probe vsock-connect 2 6001 "$bytes" 1 >/dev/null || echo "BENCH_ERROR vsock guest-to-host"
/bench/husk-guest-probe vsock-echo-many 6002 1 >/dev/null || echo "BENCH_ERROR vsock echo"
