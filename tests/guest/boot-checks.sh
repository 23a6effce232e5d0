#!/bin/sh
# Guest side of tests/tests/guest_boot.rs: runs as `husk.exec=/test/run` with
# the console as stdio. Reports what the host compares (kernel release,
# CPUs, memory) and checks what the agent must have set up. Exits 42 when
# every check passed, so the host also sees that the script's own exit code
# (not a default 0) reaches the console.

. /test/lib.sh

value uname_r "$(uname -r)"
value cpus "$(grep -c '^processor' /proc/cpuinfo)"
value mem_total_kib "$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"

check pid1_is_the_agent test "$(readlink /proc/1/exe)" = /init
check kernel_filesystems_mounted sh -c \
  'grep -q " /proc proc " /proc/mounts && grep -q " /sys sysfs " /proc/mounts && grep -q " /dev devtmpfs " /proc/mounts'
check cmdline_has_the_qemu_defaults grep -q 'reboot=t panic=-1' /proc/cmdline
check root_is_writable sh -c 'echo written > /tmp/probe && test "$(cat /tmp/probe)" = written'

finish 42
