//! husk's virtio devices, independent of any VMM: the device models (vsock,
//! fs and net), written once against `vm-memory` and `virtio-queue`, and the
//! two transports that carry them; and a balloon for free page reporting,
//! on virtio-mmio only (vhost-user has no balloon device: under QEMU the
//! guest gets QEMU's own).
//!
//! * virtio-mmio ([`MmioTransport`]): the built-in VMM maps its register
//!   window on its MMIO bus (through [`BusDevice`]) and wires queue
//!   notifications and interrupts to KVM ioeventfds and irqfds;
//! * vhost-user: each device's `serve_vhost_user` serves the same model to
//!   an external VMM (QEMU) from a thread of the calling process.
//!
//! A device model implements [`VirtioDevice`] for the MMIO transport and
//! `vhost_user_backend::VhostUserBackend` for vhost-user; the model itself
//! never learns which transport carries it.
//!
//! Whatever a guest can make a device log goes through that device's
//! [`guest_log::GuestLog`], which rate-limits it and counts what it drops.

pub mod balloon;
mod bus;
pub mod counters;
pub mod fs;
pub mod guest_log;
mod mmio;
pub mod net;
mod vhost_user;
mod virtio;
pub mod vsock;
pub mod worker;

pub use bus::BusDevice;

/// Gives the socket (or file) at `path` mode 0600: the process's umask
/// never decides who may connect to a device's socket.
pub fn owner_only(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
pub use mmio::{
    MmioError, MmioTransport, SavedQueue, TransportState, MMIO_MAGIC_VALUE, MMIO_VENDOR_ID,
    QUEUE_NOTIFY_OFFSET,
};
pub use vhost_user::ServerError as VhostUserServerError;
pub use virtio::{
    status, ActivateError, ActivatedQueue, PauseError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
pub use virtio_queue::QueueState;
