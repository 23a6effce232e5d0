//! virtio-vsock (virtio 1.2, section 5.10) with a hybrid (AF_UNIX) host side.
//!
//! The guest sees a normal virtio socket device (three queues: rx, tx,
//! event; config space = the guest's 64-bit CID). On the host there is no
//! vhost-vsock: every host peer is a Unix socket, following the Firecracker
//! "hybrid vsock" convention (see `docs/architecture.md`):
//!
//! * a host client connects to `uds_path`, writes `CONNECT <port>\n`, and once
//!   the guest accepts reads `OK <host_port>\n`, then the stream is raw bytes;
//! * a guest connection to CID 2 port `P` is forwarded to `<uds_path>_<P>`.
//!
//! The model is written once and reached by two transports:
//!
//! | module | concern |
//! | --- | --- |
//! | `model` | the device model: features, config space, and moving packets between the queues and the muxer |
//! | `packet` | the 44-byte header codec and descriptor-chain access |
//! | `csm` | one connection's state machine and flow control |
//! | `muxer` | the Unix-socket backend: listener, handshakes, connections, timers |
//! | `event_loop` | the MMIO worker thread: what wakes an activated device |
//! | `mmio` | [`VsockDevice`], the [`VirtioDevice`](crate::VirtioDevice) adapter for virtio-mmio |
//! | `vhost_user` | the `vhost-user-backend` adapter and [`serve_vhost_user`] |

mod csm;
mod event_loop;
mod mmio;
mod model;
mod muxer;
mod packet;
mod vhost_user;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use csm::CONN_BUF_ALLOC;
pub use mmio::VsockDevice;
pub use vhost_user::{serve_vhost_user, VhostUserServer};

/// The device model both transports run, for the fuzz targets, which drive
/// it with a simulated guest driver on one thread (`fuzzing` feature).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use model::{UsedQueues, VsockModel};

/// The virtio device id of a socket device (virtio 1.2, section 5, table "Device Types").
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Index of the receive queue (device to driver), virtio 1.2, 5.10.2.
pub const RX_QUEUE_INDEX: usize = 0;
/// Index of the transmit queue (driver to device), virtio 1.2, 5.10.2.
pub const TX_QUEUE_INDEX: usize = 1;
/// Index of the event queue, virtio 1.2, 5.10.2.
pub const EVENT_QUEUE_INDEX: usize = 2;
/// Number of queues of a socket device, virtio 1.2, 5.10.2.
pub const NUM_QUEUES: usize = 3;
/// Maximum size of each queue. QEMU's `vhost-user-vsock-device` (7.2 and
/// later) always sets its vrings to 1024 entries and has no option to lower
/// them, and vhost-user backends refuse a SET_VRING_NUM above their maximum,
/// so 1024 is the floor. Nothing in the model is sized by the queue: the
/// MMIO transport lets the driver pick any smaller power of two.
pub const QUEUE_SIZE: u16 = 1024;
/// The well-known CID of the host (virtio 1.2, 5.10.4; Linux `VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Lowest CID a guest may have: 0, 1 and 2 are reserved (virtio 1.2, 5.10.4).
pub const MIN_GUEST_CID: u64 = 3;
/// CIDs are 32 bits wide in practice and `u32::MAX` is `VMADDR_CID_ANY`
/// (Linux `include/uapi/linux/vm_sockets.h`), so it cannot name a guest.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// Feature bit 29: `VIRTIO_RING_F_EVENT_IDX` (virtio 1.2, 6).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Default for [`VsockConfig::max_connections`]: the limit Firecracker's
/// hybrid-vsock muxer uses. Each connection costs
/// one host fd and up to [`CONN_BUF_ALLOC`] of buffer, so one device holds
/// at most about 1023 fds and 256 MiB however the guest behaves; a pod
/// needs a handful (the agent's ttrpc, exec and I/O streams).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1023;

/// Where the device's host side lives, which CID the guest gets, and how
/// much of the host it may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id, at least 3.
    pub guest_cid: u64,
    /// The Unix socket the device listens on for host-initiated connections;
    /// guest-initiated connections to port `P` go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
    /// Most streams the device holds at once, in both directions, counting
    /// host clients still in their `CONNECT` handshake. A guest REQUEST
    /// beyond it is answered with RST; a host client beyond it is closed
    /// before its handshake is read. At least 1.
    pub max_connections: usize,
}

impl VsockConfig {
    /// A device for `guest_cid` listening on `uds_path`, with the default
    /// connection limit.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// Checks the CID range (virtio 1.2, 5.10.4) and the connection limit.
    pub fn validate(&self) -> Result<(), VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.guest_cid) {
            return Err(VsockError::InvalidCid {
                cid: self.guest_cid,
            });
        }
        if self.max_connections == 0 {
            return Err(VsockError::NoConnectionsAllowed);
        }
        Ok(())
    }
}

/// How long the device waits for each step a peer owes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockTimeouts {
    /// A host-initiated REQUEST unanswered for this long is reset and the
    /// host client closed.
    pub connect: Duration,
    /// A host client that has not sent a complete `CONNECT <port>\n` line
    /// after this long is closed.
    pub handshake: Duration,
    /// After the device sent SHUTDOWN with both flags, it waits this long
    /// for the guest's RST before it sends RST itself.
    pub close_grace: Duration,
}

/// Linux's `VSOCK_CLOSE_TIMEOUT` (`net/vmw_vsock/virtio_transport_common.c`)
/// is 8 s: the time a closing Linux socket waits for the peer's RST. We
/// mirror it for the device's own side of an orderly close.
const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(8);
/// Firecracker and the kata agent client both give a hybrid-vsock connect
/// about two seconds before retrying; the guest answers a REQUEST in
/// microseconds when something listens.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The `CONNECT <port>\n` line is written in one go by every client we know;
/// two seconds is generous and bounds idle half-open host sockets.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for VsockTimeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
            close_grace: DEFAULT_CLOSE_GRACE,
        }
    }
}

/// Errors of the vsock device and its servers.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configured CID is reserved or out of range.
    #[error("guest CID {cid} is invalid: it must be between 3 and 4294967294")]
    InvalidCid { cid: u64 },
    /// `max_connections` is 0: no stream could ever be opened.
    #[error("vsock max_connections is 0; the device needs at least 1 connection")]
    NoConnectionsAllowed,
    /// The host-side listening socket could not be created.
    #[error("cannot listen on the vsock Unix socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An epoll instance, eventfd or timerfd could not be created or used.
    #[error("vsock event plumbing failed ({what}): {source}")]
    Event {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot spawn the vsock thread {name}: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest's queues could not be read or written.
    #[error("virtqueue {queue} access failed: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user vsock server on {path}: {message}")]
    VhostUser { path: PathBuf, message: String },
}
