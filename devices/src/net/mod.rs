//! virtio-net (virtio 1.2, section 5.1) backed by a host TAP interface.
//!
//! The guest sees a network card with one receive and one transmit queue
//! (no control queue, no multiqueue) and the configuration space the spec
//! lays out (MAC, link status, MTU). On the host the card is a TAP
//! interface opened with `IFF_VNET_HDR`, so every frame crosses the TAP fd
//! with the same 12-byte `virtio_net_hdr_v1` the guest uses: checksum and
//! segmentation offloads pass through without the device touching a
//! payload byte. Which offloads the device offers depends on what the TAP
//! accepts ([`Tap::supported_offloads`]); what the guest acks for its own
//! receive side is set on the TAP after negotiation.
//!
//! The shim opens the TAP ([`Tap::open`]) on a thread inside the pod's
//! network namespace; the fd keeps working from any thread afterwards, so
//! the confined device threads never enter that namespace.
//!
//! | module | concern |
//! | --- | --- |
//! | `tap` | [`Tap`]: creating the interface, probing and setting its offloads; the frame-device seam the tests replace |
//! | `model` | the device model: features, config space, counters, and moving frames between the queues and the TAP |
//! | `mmio` | [`NetDevice`], the [`VirtioDevice`](crate::VirtioDevice) adapter for virtio-mmio, and its worker thread |
//! | `vhost_user` | the `vhost-user-backend` adapter and [`serve_vhost_user`], for QEMU's `-netdev vhost-user` |

mod mmio;
mod model;
mod tap;
mod vhost_user;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use mmio::NetDevice;
pub use tap::{Tap, TapOffloads};
pub use vhost_user::{serve_vhost_user, VhostUserServer};

/// The virtio device id of a network card (virtio 1.2, section 5).
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Index of the receive queue (`receiveq1`, virtio 1.2, 5.1.2).
pub const RX_QUEUE_INDEX: usize = 0;
/// Index of the transmit queue (`transmitq1`, virtio 1.2, 5.1.2).
pub const TX_QUEUE_INDEX: usize = 1;
/// One queue pair and no control queue: VIRTIO_NET_F_MQ and
/// VIRTIO_NET_F_CTRL_VQ are not offered.
pub const NUM_QUEUES: usize = 2;
/// Largest queue the MMIO transport offers. Linux sizes its rings to the
/// maximum the device reports, and 256 (Firecracker's and QEMU's default
/// for virtio-net) keeps a guest's posted receive buffers to a few MiB.
pub const MMIO_QUEUE_SIZE: u16 = 256;
/// Largest vring the vhost-user backend accepts: QEMU's virtio-net takes
/// `rx_queue_size`/`tx_queue_size` up to `VIRTQUEUE_MAX_SIZE` (1024) and a
/// backend must refuse SET_VRING_NUM above its maximum, so anything less
/// would turn a valid QEMU option into a failed session.
pub const VHOST_USER_QUEUE_SIZE: u16 = 1024;
/// Size of `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6): with
/// VIRTIO_F_VERSION_1 the header always has `num_buffers`, whatever
/// VIRTIO_NET_F_MRG_RXBUF says. The TAP is set to the same size.
pub const VNET_HDR_LEN: usize = 12;
/// Smallest MTU the device may report (virtio 1.2, 5.1.4.1), also IPv4's
/// minimum (RFC 791: a 60-byte header and an 8-byte fragment).
pub const MIN_MTU: u16 = 68;
/// Largest MTU the device may report (virtio 1.2, 5.1.4.1); IPv4's total
/// length field cannot describe a longer packet either.
pub const MAX_MTU: u16 = u16::MAX;
/// The MTU of an Ethernet segment, the usual choice for a pod's interface.
pub const DEFAULT_MTU: u16 = 1500;

/// The guest-visible identity of the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address the guest's driver adopts (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// The MTU the guest's driver adopts (VIRTIO_NET_F_MTU), between
    /// [`MIN_MTU`] and [`MAX_MTU`]. Over vhost-user QEMU owns the config
    /// space, so there the guest sees QEMU's `host_mtu` instead.
    pub mtu: u16,
}

impl NetConfig {
    /// A card with `mac` and the Ethernet MTU.
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            mac,
            mtu: DEFAULT_MTU,
        }
    }

    /// Checks that the MAC can name one interface (not all zeros, not a
    /// group address) and that the MTU is in the spec's range.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.mac == [0; 6] {
            return Err(NetError::InvalidMac {
                mac: self.mac,
                reason: "it is all zeros",
            });
        }
        // Bit 0 of the first octet is the I/G bit (IEEE 802): set, the
        // address names a group, which no single card may use as its own.
        if self.mac[0] & 1 != 0 {
            return Err(NetError::InvalidMac {
                mac: self.mac,
                reason: "it is a multicast address (bit 0 of the first octet is set)",
            });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(NetError::InvalidMtu { mtu: self.mtu });
        }
        Ok(())
    }
}

/// Formats a MAC address as `02:00:00:00:00:01`.
struct MacDisplay([u8; 6]);

impl std::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// What the device has moved and refused since it was created; counters
/// survive resets and vhost-user reconnects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that reached the TAP.
    pub tx_packets: u64,
    /// Their bytes, Ethernet header included, virtio-net header excluded.
    pub tx_bytes: u64,
    /// Guest transmit chains refused (malformed, oversized, offloads the
    /// driver did not negotiate) or that the TAP refused.
    pub tx_errors: u64,
    /// Frames from the TAP delivered to the guest.
    pub rx_packets: u64,
    /// Their bytes, Ethernet header included, virtio-net header excluded.
    pub rx_bytes: u64,
    /// Guest receive chains refused as malformed, and failed TAP reads.
    pub rx_errors: u64,
    /// Frames from the TAP the guest could not take: larger than its
    /// buffers, or with offloads it did not negotiate.
    pub rx_dropped: u64,
}

/// Errors of the net device, its TAP and its servers.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configured MAC cannot be a card's own address.
    #[error("net config field `mac`: {mac} is invalid: {reason}", mac = MacDisplay(*.mac))]
    InvalidMac { mac: [u8; 6], reason: &'static str },
    /// The configured MTU is outside the spec's range.
    #[error(
        "net config field `mtu`: {mtu} is invalid: it must be between {MIN_MTU} and {MAX_MTU}"
    )]
    InvalidMtu { mtu: u16 },
    /// The TAP name is not a name Linux accepts for an interface.
    #[error("TAP interface name {name:?} is invalid: {reason}")]
    InvalidTapName { name: String, reason: &'static str },
    /// The TUN/TAP control device could not be opened.
    #[error("cannot open {path} for TAP interface {name}: {source}")]
    OpenTun {
        path: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// An ioctl on the TAP fd failed.
    #[error("TAP interface {name}: {request} failed: {source}")]
    TapIoctl {
        name: String,
        request: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's TUN driver lacks a feature the device needs.
    #[error("TAP interface {name}: the kernel's TUN driver does not support {feature}")]
    TapUnsupported { name: String, feature: &'static str },
    /// An epoll instance or eventfd could not be created or used.
    #[error("net device {name}: event plumbing failed ({what}): {source}")]
    Event {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot spawn the net thread {name}: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest's queues could not be read or written.
    #[error("net virtqueue {queue} access failed: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// The vhost-user server or its daemon failed.
    #[error("vhost-user net server on {path}: {message}")]
    VhostUser { path: PathBuf, message: String },
}
