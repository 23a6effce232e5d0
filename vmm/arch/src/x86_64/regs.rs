//! The register state a vCPU starts the guest kernel with.
//!
//! The bootstrap vCPU is put directly at the kernel entry point in the mode
//! its boot protocol expects, with no firmware in between:
//!
//! * [`BootProtocol::LinuxBoot64`]: 64-bit long mode (paging on with the
//!   identity map from `paging`, flat 64-bit code segment), RSI = zero page,
//!   RSP = `BOOT_STACK_POINTER`;
//! * [`BootProtocol::Pvh`]: 32-bit protected mode, paging off, flat 32-bit
//!   segments, EBX = `hvm_start_info`.
//!
//! The pure parts ([`boot_sregs`], [`boot_regs`], [`boot_fpu`]) compute KVM
//! structures and are unit tested; [`setup_boot_vcpu_state`] writes the GDT,
//! IDT and page tables into guest memory and issues the ioctls. Application
//! processors only get FPU and MSR state: the in-kernel LAPIC holds them in
//! wait-for-SIPI until the guest starts them.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{
    boot_gdt, segment_from_gdt_entry, BOOT_GDT_ENTRIES, GDT_CODE_INDEX, GDT_DATA_INDEX,
    GDT_TSS_INDEX,
};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};
use super::msr::setup_boot_msrs;
use super::paging::setup_identity_page_tables;

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type, hard-wired to 1 since the 486.
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension, required for long mode.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active (set by the CPU; KVM_SET_SREGS wants it set).
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always reads as 1.
pub const RFLAGS_RESERVED_BIT: u64 = 1 << 1;
/// x87 control word after FNINIT: all exceptions masked, 64-bit precision.
pub const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR reset value: all SSE exceptions masked.
pub const MXCSR_DEFAULT: u32 = 0x1f80;
/// Size of the boot IDT: one empty gate, so any exception before the kernel
/// installs its own IDT shuts the VM down instead of running garbage.
const BOOT_IDT_ENTRIES: usize = 1;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol (ELF vmlinux entry or bzImage 64-bit entry):
    /// long mode, RSI = zero page.
    LinuxBoot64,
    /// PVH: 32-bit protected mode without paging, EBX = `hvm_start_info`.
    Pvh,
}

/// Errors while setting up vCPU state.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {what} at {addr:#x} to guest memory: {source}")]
    GuestMemoryWrite {
        /// Which structure.
        what: &'static str,
        /// Guest address it was written to.
        addr: u64,
        /// The guest memory error.
        source: GuestMemoryError,
    },
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// The MSR list could not be built.
    #[error("cannot build a KVM MSR list of {count} entries: {source:?}")]
    MsrList {
        /// Number of MSRs.
        count: usize,
        /// The FAM wrapper error.
        source: vmm_sys_util::fam::Error,
    },
    /// KVM_SET_MSRS failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM refused one of the MSRs.
    #[error("KVM set only {written} of {total} boot MSRs; it refused MSR {index:#x}")]
    MsrRefused {
        /// Index of the first MSR not set.
        index: u32,
        /// How many were set.
        written: usize,
        /// How many were asked for.
        total: usize,
    },
    /// KVM_GET_LAPIC failed (no in-kernel irqchip?).
    #[error("KVM_GET_LAPIC failed (is the in-kernel irqchip created?): {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// The special registers for `protocol`, starting from `sregs` (what KVM
/// reports for a freshly created vCPU, so fields we do not own such as
/// `apic_base` keep their values). `cr3` is the page-table root for long mode.
pub fn boot_sregs(protocol: BootProtocol, sregs: &kvm_sregs, cr3: u64) -> kvm_sregs {
    let mut sregs = *sregs;
    let gdt = boot_gdt(protocol);
    let code = segment_from_gdt_entry(gdt[usize::from(GDT_CODE_INDEX)], GDT_CODE_INDEX);
    let data = segment_from_gdt_entry(gdt[usize::from(GDT_DATA_INDEX)], GDT_DATA_INDEX);
    let tss = segment_from_gdt_entry(gdt[usize::from(GDT_TSS_INDEX)], GDT_TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (BOOT_IDT_ENTRIES * 8 - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Caches on (CD/NW clear), as firmware would leave them.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr2 = 0;
    match protocol {
        BootProtocol::LinuxBoot64 => {
            sregs.cr0 |= X86_CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// The general registers at the kernel entry `entry` with the boot
/// information (zero page or start info) at `boot_info_addr`.
pub fn boot_regs(
    protocol: BootProtocol,
    entry: GuestAddress,
    boot_info_addr: GuestAddress,
) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED_BIT,
        rip: entry.0,
        ..Default::default()
    };
    match protocol {
        BootProtocol::LinuxBoot64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info_addr.0;
        }
        BootProtocol::Pvh => regs.rbx = boot_info_addr.0,
    }
    regs
}

/// The FPU/SSE state after FNINIT with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// Writes the boot GDT for `protocol` and an empty IDT into guest memory.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt(protocol).iter().enumerate() {
        let addr = BOOT_GDT_START + (i * 8) as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|source| RegsError::GuestMemoryWrite {
                what: "boot GDT",
                addr,
                source,
            })?;
    }
    mem.write_slice(&[0u8; BOOT_IDT_ENTRIES * 8], GuestAddress(BOOT_IDT_START))
        .map_err(|source| RegsError::GuestMemoryWrite {
            what: "boot IDT",
            addr: BOOT_IDT_START,
            source,
        })
}

/// Puts the bootstrap vCPU at `entry` for `protocol`: GDT, IDT (and page
/// tables for long mode) in guest memory, then special registers, general
/// registers, FPU and boot MSRs. `boot_info_addr` is the zero page
/// (LinuxBoot64) or the PVH start info (Pvh).
pub fn setup_boot_vcpu_state(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    entry: GuestAddress,
    boot_info_addr: GuestAddress,
) -> Result<(), RegsError> {
    write_gdt_and_idt(mem, protocol)?;
    let cr3 = match protocol {
        BootProtocol::LinuxBoot64 => setup_identity_page_tables(mem)?,
        BootProtocol::Pvh => 0,
    };
    let current = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(protocol, &current, cr3))
        .map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&boot_regs(protocol, entry, boot_info_addr))
        .map_err(RegsError::SetRegs)?;
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)?;
    setup_boot_msrs(vcpu)
}

/// Application processors: FPU and boot MSRs only; their registers come from
/// the INIT/SIPI sequence the guest sends through the in-kernel LAPIC.
pub fn setup_ap_vcpu_state(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)?;
    setup_boot_msrs(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::{PML4_START, ZERO_PAGE_START};

    #[test]
    fn long_mode_sregs_enable_paging_pae_and_lma_with_64_bit_cs() {
        let s = boot_sregs(BootProtocol::LinuxBoot64, &kvm_sregs::default(), PML4_START);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr0 & (3 << 29), 0, "CD/NW must be clear");
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x08, 1, 0));
        assert_eq!(
            (s.ds.selector, s.ss.selector, s.tr.selector),
            (0x10, 0x10, 0x18)
        );
        assert_eq!((s.gdt.base, s.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((s.idt.base, s.idt.limit), (BOOT_IDT_START, 7));
    }

    #[test]
    fn pvh_sregs_are_32_bit_protected_mode_without_paging() {
        let s = boot_sregs(BootProtocol::Pvh, &kvm_sregs::default(), PML4_START);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(
            (s.cs.l, s.cs.db, s.cs.limit, s.cs.base),
            (0, 1, 0xffff_ffff, 0)
        );
        assert_eq!((s.tr.type_, s.tr.present), (0xb, 1));
    }

    #[test]
    fn regs_carry_entry_and_boot_info_in_the_protocol_register() {
        let r = boot_regs(
            BootProtocol::LinuxBoot64,
            GuestAddress(0x100_0000),
            GuestAddress(ZERO_PAGE_START),
        );
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER, 2)
        );
        let r = boot_regs(
            BootProtocol::Pvh,
            GuestAddress(0x100_0200),
            GuestAddress(0x6000),
        );
        assert_eq!((r.rip, r.rbx, r.rsi, r.rflags), (0x100_0200, 0x6000, 0, 2));
    }

    #[test]
    fn fpu_has_reset_control_word_and_mxcsr() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn gdt_and_idt_read_back_from_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0xaa; 8], GuestAddress(BOOT_IDT_START))
            .unwrap();
        write_gdt_and_idt(&mem, BootProtocol::LinuxBoot64).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let data: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(data, 0x00cf_9300_0000_ffff);
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }
}
