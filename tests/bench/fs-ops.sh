#!/bin/sh
# Timed file-system operations for `make bench`, run by busybox sh in the
# guest (on the virtio-fs mount) and on the host (on a plain directory), so
# both sides do exactly the same work. Prints `BENCH <name> <seconds>` lines.
# Usage: fs-ops.sh DIR MIB FILES
set -u
dir=$1; mib=$2; files=$3
t() { name=$1; shift; echo "BENCH $name $(busybox time -f %e "$@" 2>&1 >/dev/null | tail -n 1)"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

t fs_seq_write busybox sh -c "dd if=/dev/zero of=$dir/bench.dat bs=1M count=$mib conv=fsync 2>/dev/null"
drop_caches
t fs_seq_read busybox sh -c "dd if=$dir/bench.dat of=/dev/null bs=1M 2>/dev/null"
rm -f "$dir/bench.dat"
mkdir -p "$dir/meta"
t fs_create busybox sh -c "cd $dir/meta && i=0; while [ \$i -lt $files ]; do : > f\$i; i=\$((i+1)); done"
drop_caches
t fs_stat busybox ls -l "$dir/meta"
t fs_unlink busybox rm -r "$dir/meta"
