//! Devices of the husk microVM: the buses that route guest accesses, the
//! legacy PC devices, the boot timer, and virtio over MMIO.

pub mod boot_timer;
pub mod bus;
pub mod legacy;
pub mod virtio;
