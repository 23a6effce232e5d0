//! Architecture support for the husk VMM (x86_64 only).
//!
//! Everything the VMM needs to describe a machine to a Linux guest before its
//! first instruction: the guest physical layout, the E820 map and zero page
//! (Linux boot protocol), the PVH start info, the MP table, per-vCPU CPUID and
//! the boot register state. The structures are pure functions over
//! `vm-memory` guest memory and `kvm-bindings` values so they are unit tested
//! without `/dev/kvm`; only the functions taking a `VcpuFd` issue ioctls.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
