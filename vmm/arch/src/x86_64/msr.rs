//! Model-specific registers every vCPU starts with.
//!
//! KVM resets MSRs to architectural values, but a VMM acting as firmware
//! sets a few to what a BIOS leaves behind: the SYSENTER/SYSCALL MSRs and
//! KERNEL_GS_BASE cleared, the TSC at 0 (written on every vCPU at about the
//! same time, so KVM treats the writes as synchronised), fast string
//! operations enabled in MISC_ENABLE, and the MTRRs enabled with write-back
//! as default type so the guest does not run uncached. Built as a plain list
//! of `kvm_msr_entry` (unit tested), then written with one KVM_SET_MSRS.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::regs::RegsError;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_STAR (SYSCALL segment selectors).
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR (compatibility-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK (SYSCALL RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE (SWAPGS).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MISC_ENABLE bit 0: fast-string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back (Intel SDM Vol. 3A, table 11-8).
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The MSR values every vCPU (BSP and APs) boots with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Writes [`boot_msr_entries`] to `vcpu`. KVM stops at the first MSR it
/// refuses and returns how many it set; that MSR is named in the error.
pub fn setup_boot_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|source| RegsError::MsrList {
        count: entries.len(),
        source,
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(RegsError::SetMsrs)?;
    if written != entries.len() {
        return Err(RegsError::MsrRefused {
            index: entries.get(written).map_or(0, |e| e.index),
            written,
            total: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_mtrrs() {
        let entries = boot_msr_entries();
        let value = |index: u32| {
            entries
                .iter()
                .find(|e| e.index == index)
                .map(|e| e.data)
                .unwrap_or_else(|| panic!("MSR {index:#x} missing"))
        };
        assert_eq!(value(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(value(MSR_MTRR_DEF_TYPE), 0x806);
        for index in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value(index), 0, "MSR {index:#x}");
        }
        assert!(entries.len() <= kvm_bindings::KVM_MAX_MSR_ENTRIES);
    }
}
