//! KVM's part of a snapshot: what the kernel holds for the VM (interrupt
//! controllers, PIT, kvmclock) and for each vCPU (registers, FPU/XSAVE,
//! local APIC, MSRs, pending events), read through the `KVM_GET_*` ioctls
//! and written back with `KVM_SET_*` in the order the kernel needs.
//!
//! Every structure is KVM's own (`kvm-bindings`, serde through its byte
//! form), so a snapshot restores only on a host whose KVM and CPU agree
//! with the one that took it; [`crate::snapshot`] checks that before
//! anything is written back.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Which KVM call failed, and how.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("{call} failed{}: {source}", vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default())]
    Ioctl {
        call: &'static str,
        vcpu: Option<u8>,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused the saved value of MSR {msr:#x} on vCPU {vcpu}")]
    MsrRefused { vcpu: u8, msr: u32 },
    #[error("vCPU {vcpu}'s saved {what} has {count} entries, more than KVM takes")]
    TooManyEntries {
        vcpu: u8,
        what: &'static str,
        count: usize,
    },
}

/// The VM-wide state kept in the kernel.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the VM's state; the vCPUs must be out of `KVM_RUN`.
    pub fn capture(vm: &VmFd) -> Result<Self, KvmStateError> {
        let failed = |call| {
            move |source| KvmStateError::Ioctl {
                call,
                vcpu: None,
                source,
            }
        };
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map(|()| chip)
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)
                .map_err(failed("KVM_GET_IRQCHIP (PIC master)"))?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)
                .map_err(failed("KVM_GET_IRQCHIP (PIC slave)"))?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(failed("KVM_GET_IRQCHIP (IOAPIC)"))?,
            pit: vm.get_pit2().map_err(failed("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(failed("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a VM that has its irqchip and PIT.
    ///
    /// The kvmclock is set to the value it had when the snapshot was taken
    /// (flags cleared: no correction by the host's real time), so the
    /// guest's monotonic clock does not jump over the time the snapshot
    /// sat on disk; its wall clock is the guest's own business (the agent
    /// sets it from the host).
    pub fn apply(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        let failed = |call| {
            move |source| KvmStateError::Ioctl {
                call,
                vcpu: None,
                source,
            }
        };
        vm.set_pit2(&self.pit).map_err(failed("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(failed("KVM_SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(failed("KVM_SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(failed("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(failed("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}

/// One vCPU's state kept in the kernel.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads a vCPU's state. The vCPU must be out of `KVM_RUN` with any
    /// I/O it exited for completed (see `Vcpu::run_loop`), and `msr_indices`
    /// names the MSRs to keep (KVM's `KVM_GET_MSR_INDEX_LIST`); those KVM
    /// cannot read for this vCPU are left out.
    pub fn capture(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, KvmStateError> {
        let failed = |call| {
            move |source| KvmStateError::Ioctl {
                call,
                vcpu: Some(index),
                source,
            }
        };
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(failed("KVM_GET_CPUID2"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(failed("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(failed("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(failed("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(failed("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(failed("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(failed("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(failed("KVM_GET_LAPIC"))?,
            msrs: readable_msrs(fd, index, msr_indices)?,
            vcpu_events: fd
                .get_vcpu_events()
                .map_err(failed("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Writes the state into a freshly created vCPU, in the order KVM
    /// needs: CPUID before anything that depends on the CPU's features,
    /// special registers before the general ones' use of them, the local
    /// APIC before the MSRs that program its timer, pending events last.
    pub fn apply(&self, fd: &VcpuFd, index: u8) -> Result<(), KvmStateError> {
        let failed = |call| {
            move |source| KvmStateError::Ioctl {
                call,
                vcpu: Some(index),
                source,
            }
        };
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| KvmStateError::TooManyEntries {
                vcpu: index,
                what: "CPUID",
                count: self.cpuid.len(),
            })?;
        fd.set_cpuid2(&cpuid).map_err(failed("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(failed("KVM_SET_MP_STATE"))?;
        fd.set_sregs(&self.sregs).map_err(failed("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(failed("KVM_SET_REGS"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` as KVM_GET_XSAVE
        // returned it: the legacy 4 KiB area, no trailing dynamic state.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(failed("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(failed("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(failed("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(failed("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| KvmStateError::TooManyEntries {
            vcpu: index,
            what: "MSR list",
            count: self.msrs.len(),
        })?;
        let written = fd.set_msrs(&msrs).map_err(failed("KVM_SET_MSRS"))?;
        if let Some(refused) = self.msrs.get(written) {
            return Err(KvmStateError::MsrRefused {
                vcpu: index,
                msr: refused.index,
            });
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(failed("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The largest batch `KVM_GET_MSRS` is given at once.
const MSR_BATCH: usize = 256;

/// Reads every MSR of `indices` that KVM can read for this vCPU.
/// `KVM_GET_MSRS` stops at the first MSR it cannot read and says how many
/// it read; that one is skipped and the rest read on.
fn readable_msrs(
    fd: &VcpuFd,
    index: u8,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&msr| kvm_msr_entry {
                index: msr,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmStateError::TooManyEntries {
            vcpu: index,
            what: "MSR batch",
            count: entries.len(),
        })?;
        let count = fd
            .get_msrs(&mut msrs)
            .map_err(|source| KvmStateError::Ioctl {
                call: "KVM_GET_MSRS",
                vcpu: Some(index),
                source,
            })?;
        read.extend_from_slice(&msrs.as_slice()[..count]);
        // Skip the one KVM could not read, if the batch stopped early.
        let consumed = if count < batch.len() {
            count + 1
        } else {
            count
        };
        rest = &rest[consumed..];
    }
    Ok(read)
}
