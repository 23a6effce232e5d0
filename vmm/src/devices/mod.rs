//! Devices of the husk microVM: the buses that route guest accesses, the
//! legacy PC devices and the boot timer. The virtio devices and their
//! virtio-mmio transport live in `husk-devices`.

pub mod boot_timer;
pub mod bus;
pub mod legacy;
