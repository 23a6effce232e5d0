//! The `qemu` hypervisor backend: runs one guest in `qemu-system-x86_64 -M
//! microvm`, with the vsock and virtio-fs device models reached over
//! vhost-user from this process (see `docs/architecture.md`, "One device
//! model, two transports"). [`QemuPodVm`] is the backend behind the
//! [`super::Hypervisor`] seam; the rest drives QEMU itself.
//!
//! Start with [`QemuVmConfig`]: give it the kernel, initrd and console log,
//! add the vhost-user devices, then [`QemuVm::start`] (or
//! [`QemuVm::start_paused`], to do something between QEMU's start and the
//! guest's: the pod records the QEMU pid there). The VM ends when the
//! guest powers off (the default command line makes a guest reset or panic
//! end QEMU), when [`QemuVm::stop`] asks QEMU to quit over QMP, or when the
//! VM is dropped; in every case the QEMU process is reaped and the VM's run
//! directory (QEMU's own output) is removed.
//!
//! The module is split by concern: [`binary`] finds QEMU and checks its
//! version, [`accel`] decides between KVM and TCG, [`config`] is the
//! builder, [`identity`] decides who QEMU runs as and checks that user can
//! open what QEMU opens, [`command`] assembles the command line, [`spawner`] forks QEMU
//! so that it dies with the shim, [`process`] supervises the QEMU process,
//! [`qmp`] is the QMP client, [`end`] decides how the
//! guest ended, [`vm`] ties them together, and `pod_vm` serves a pod's
//! devices to it.

mod accel;
mod binary;
mod command;
mod config;
mod end;
mod error;
pub mod identity;
mod pod_vm;
mod process;
mod qmp;
mod spawner;
mod vm;

pub use accel::{Accel, AccelChoice, ResolvedAccel, TCG_TRANSLATION_CACHE_MIB};
pub use binary::{QemuVersion, MINIMUM_QEMU_VERSION, QEMU_PROGRAM};
pub use command::MAX_SOCKET_PATH_BYTES;
pub use config::{QemuVmConfig, VhostUserFs, VhostUserVsock, DEFAULT_QEMU_CMDLINE};
pub use end::GuestEnd;
pub use error::QemuError;
pub use identity::{IdRange, QemuIdentity, RunAs, DEFAULT_QEMU_ID_COUNT, DEFAULT_QEMU_ID_FIRST};
pub use pod_vm::{QemuPodVm, VMM_PID_FILE};
pub use qmp::{QmpClient, QmpError};
pub use vm::{PausedQemuVm, QemuVm};
