#!/usr/bin/env bash
# `make demo`: boot the husk microVM and show the guest's console.
#
# Until the shim's task service exists, the demo boots the guest kernel and
# the agent initramfs directly:
#  1. in the built-in VMM (husk-vmm): to the agent where the host's KVM runs
#     stock guests; on a PVM host (see docs/architecture.md) the kernel
#     only gets through its early boot, and the demo says so;
#  2. where the built-in VMM cannot reach the agent, under QEMU with TCG, the
#     fallback the product's `hypervisor = "auto"` chooses on such hosts.
set -uo pipefail
cd "$(dirname "$0")/.."
kernel=${HUSK_KERNEL:-build/vmlinux}
bzimage=${HUSK_BZIMAGE:-build/bzImage}
initrd=${HUSK_INITRD:-build/initramfs.cpio.gz}
vmm=${HUSK_VMM:-target/release/husk-vmm}
log=$(mktemp /tmp/husk-demo-console.XXXXXX)
trap 'rm -f "$log"' EXIT

pvm=0; [ -d /sys/module/kvm_pvm ] && pvm=1
echo "host kernel: $(uname -r)    host KVM: $([ $pvm = 1 ] && echo 'PVM (kvm_pvm)' || echo hardware-assisted)"
echo
echo "=== 1. built-in VMM: husk-vmm --vcpus 2 --memory-mib 128 (guest console follows)"
if [ $pvm = 1 ]; then
  # The early boot runs under PVM's emulator; show it up to where it stops.
  timeout 120 "$vmm" --kernel "$kernel" --initrd "$initrd" --vcpus 2 --memory-mib 128 \
    --cmdline "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 husk.power_off_after_ms=0" \
    --timeout-secs 60 >"$log" 2>&1
  status=$?
  grep -E "Linux version|Command line:|BIOS-e820|Processor|Processors:|RAMDISK|Kernel command line" "$log" | tr -d '\r'
  echo "... $(tail -n 1 "$log")"
  echo "husk-vmm exit status $status: this host's PVM KVM cannot run a stock guest kernel past early boot."
  echo "On a host with hardware KVM the same command boots to the agent and powers off with status 0."
else
  "$vmm" --kernel "$kernel" --initrd "$initrd" --vcpus 2 --memory-mib 128 \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet husk.power_off_after_ms=0" --timeout-secs 60
  echo "husk-vmm exit status $? (0 = the guest powered off cleanly)"
  exit 0
fi

echo
echo "=== 2. the same guest kernel and agent under QEMU microvm with TCG (the fallback on this host)"
timeout 120 qemu-system-x86_64 -M microvm,acpi=off -accel tcg -cpu max -m 128 -smp 2 \
  -kernel "$bzimage" -initrd "$initrd" \
  -append "console=ttyS0 reboot=t panic=-1 quiet husk.power_off_after_ms=0" \
  -nodefaults -no-reboot -nographic -serial stdio 2>&1 | tr -d '\r' | tee "$log"
guest_kernel=$(sed -n 's/.*HUSK_AGENT_READY.*kernel=\([^ ]*\).*/\1/p' "$log")
echo
echo "guest kernel (reported by husk-agent, PID 1 in the VM): ${guest_kernel:-not reached}"
echo "host kernel:                                          $(uname -r)"
