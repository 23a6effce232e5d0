//! x86_64 boot structures for a KVM microVM.
//!
//! One concern per module: [`layout`] fixes where everything lives in guest
//! physical memory, [`e820`] describes that memory to the guest, [`boot`]
//! holds what both boot protocols share (command line, initrd),
//! [`zero_page`] and [`pvh`] write the Linux and PVH boot information,
//! [`mptable`] announces the vCPUs and the IOAPIC, [`cpuid`] shapes what each
//! vCPU reports about itself, and [`gdt`], [`paging`], [`msr`], [`regs`] and
//! [`lapic`] put a vCPU into the state the kernel entry point expects.

pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod pvh;
pub mod regs;
pub mod zero_page;

pub use boot::*;
pub use cpuid::*;
pub use e820::*;
pub use gdt::*;
pub use lapic::*;
pub use layout::*;
pub use mptable::*;
pub use msr::*;
pub use paging::*;
pub use pvh::*;
pub use regs::*;
pub use zero_page::*;
