//! husk's microVM monitor, as a library: KVM boot of a Linux guest (ELF
//! vmlinux with 64-bit or PVH entry, or bzImage), the port-I/O and MMIO
//! buses, the legacy devices a guest needs (8250 console, i8042 reset) and a
//! boot timer. The virtio devices and their virtio-mmio transport come from
//! `husk-devices`; the builder maps each one on the MMIO bus. The `husk-vmm`
//! debug binary is the separate `husk-vmm-cli` crate (`vmm/cli`).
//!
//! Start with [`VmBuilder`]: configure, `build()`, then `run()` (or
//! `start()` / `wait()` / `stop()` when the caller keeps the VM alive).
//! A running VM can `pause()`, be saved with `snapshot()`, and `resume()`;
//! `VmBuilder::restore_snapshot` builds a VM that continues from a
//! snapshot ([`snapshot`]).

pub mod builder;
pub mod devices;
pub mod host;
pub mod loader;
pub mod microvm;
pub mod snapshot;
pub mod vstate;

pub use builder::{BuildError, VmBuilder, DEFAULT_CMDLINE};
pub use devices::legacy::{SerialSink, SharedBuffer};
pub use loader::BootProtocolChoice;
pub use microvm::{BootReport, MicroVm, RunError};
pub use snapshot::{SnapshotError, SnapshotSummary};
pub use vstate::vcpu::VmExit;
