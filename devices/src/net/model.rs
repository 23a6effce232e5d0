//! The virtio-net device model, written once for both transports.
//!
//! The driver negotiates [`device_features`] and reads the configuration
//! space ([`read_config`]); once the device runs, a [`NetModel`] moves
//! frames: [`NetModel::pump`] drains the transmit queue into the TAP and
//! fills receive buffers from it, on a plain `virtio_queue::Queue` and any
//! `GuestMemory`, and tells its caller whom to notify and whether work is
//! left. Each adapter owns the threads and the notification plumbing: the
//! MMIO worker ([`super::mmio`]) and the vhost-user backend
//! ([`super::vhost_user`]) call the model when a queue is kicked or the TAP
//! turns readable, and come back when it says work is left.
//!
//! Every chain is guest input and is checked before use: directions,
//! addresses (through `vm-memory`), descriptor counts and lengths. A chain
//! that fails is returned with length 0, counted in [`NetStats`] and logged
//! through the device's [`GuestLog`]. What chains can make the model hold
//! is bounded by the descriptor limit and the queue size; the frame buffer
//! is allocated once, whatever the guest does. The header of a transmitted frame is copied out of guest
//! memory before it is checked and is written from that copy, so the guest
//! cannot change it between the check and the TAP's read.
//!
//! Transmit: one chain is one frame, header then Ethernet frame, written to
//! the TAP with one `writev` straight from guest memory.
//!
//! Receive: the TAP is read (non-blocking) into a frame buffer of fixed
//! size, then the frame is copied into as many receive chains as it needs
//! when VIRTIO_NET_F_MRG_RXBUF was negotiated (`num_buffers` says how many),
//! or into one chain otherwise. Chains are taken from the ring until the
//! frame fits; when the ring runs dry first, the ring is rewound to the
//! first chain taken (they are read again, and checked again, once the
//! driver adds more) and the frame waits in the model. While a frame waits
//! the TAP is not read, so nothing is dropped and nothing spins. No chain
//! stays taken between pumps: over vhost-user the frontend may stop the
//! ring at any time, and a chain the ring's position already passed would
//! be lost to the guest. The TAP fd is watched edge-triggered: the model
//! reads until EAGAIN before it waits for the next edge, or until the
//! guest kicks the receive queue.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::tap::{FrameDevice, TapOffloads};
use super::{NetConfig, NetError, NetStats, RX_QUEUE_INDEX, TX_QUEUE_INDEX, VNET_HDR_LEN};
use crate::guest_log::{guest_warn, GuestLog};
use crate::virtio::rearm_and_recheck;

/// Feature bits as masks.
const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// VIRTIO_RING_F_EVENT_IDX (virtio 1.2, 6), offered by every husk device.
pub const EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
/// Mergeable receive buffers (virtio 1.2, 5.1.6.3.1).
pub const MRG_RXBUF: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
/// The device checksums frames the driver leaves partial.
pub const CSUM: u64 = bit(VIRTIO_NET_F_CSUM);
/// The driver takes frames with a partial checksum.
pub const GUEST_CSUM: u64 = bit(VIRTIO_NET_F_GUEST_CSUM);
/// The device segments TCP-over-IPv4 frames the driver sends (needs CSUM).
pub const HOST_TSO4: u64 = bit(VIRTIO_NET_F_HOST_TSO4);
/// The device segments TCP-over-IPv6 frames the driver sends (needs CSUM).
pub const HOST_TSO6: u64 = bit(VIRTIO_NET_F_HOST_TSO6);
/// The driver takes unsegmented TCP-over-IPv4 frames (needs GUEST_CSUM).
pub const GUEST_TSO4: u64 = bit(VIRTIO_NET_F_GUEST_TSO4);
/// The driver takes unsegmented TCP-over-IPv6 frames (needs GUEST_CSUM).
pub const GUEST_TSO6: u64 = bit(VIRTIO_NET_F_GUEST_TSO6);
/// The features offered whatever the TAP supports (VERSION_1 aside, which
/// each transport adds).
pub const BASE_FEATURES: u64 =
    bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MTU) | MRG_RXBUF | EVENT_IDX;

/// Size of the configuration space the device fills: `mac[6]`,
/// `le16 status`, `le16 max_virtqueue_pairs`, `le16 mtu` (virtio 1.2,
/// 5.1.4); the fields after `mtu` belong to features we do not offer.
pub const CONFIG_SPACE_LEN: usize = 12;
/// An Ethernet header: two addresses and the EtherType.
const ETH_HLEN: usize = 14;
/// An Ethernet header with one 802.1Q tag.
const MAX_L2_HLEN: usize = ETH_HLEN + 4;
/// Largest frame either way, virtio-net header excluded: a 64 KiB GSO
/// packet (Linux's `GSO_LEGACY_MAX_SIZE`, the most its virtio-net driver
/// sends and a TAP delivers unless BIG TCP is configured) behind a tagged
/// Ethernet header. It also covers a full [`super::MAX_MTU`] frame.
pub const MAX_FRAME_LEN: usize = 65_536 + MAX_L2_HLEN;
/// Most non-empty descriptors one chain may have. Linux's driver uses at
/// most `MAX_SKB_FRAGS + 2` (19 by default, 47 at the largest
/// `CONFIG_MAX_SKB_FRAGS`) per packet and one per mergeable buffer.
const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// iovecs for one `writev`: the header copy plus the frame's descriptors,
/// each of which may straddle two guest memory regions.
const MAX_IOVECS: usize = 1 + 2 * MAX_CHAIN_DESCRIPTORS;
/// Frames moved per direction before a pump returns with work left, so a
/// busy direction neither starves the other nor keeps the adapter from
/// seeing a stop request.
pub const PUMP_BUDGET: usize = 256;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// The features a device over a TAP with `supported` offloads offers.
/// Guest-side offloads are offered only where the TAP can deliver them,
/// and host-side ones alongside, since both rest on the same checksum and
/// segmentation support.
pub fn device_features(supported: TapOffloads) -> u64 {
    let mut features = BASE_FEATURES;
    if supported.csum {
        features |= CSUM | GUEST_CSUM;
        if supported.tso4 {
            features |= HOST_TSO4 | GUEST_TSO4;
        }
        if supported.tso6 {
            features |= HOST_TSO6 | GUEST_TSO6;
        }
    }
    features
}

/// The TAP offloads that match what the driver acked for its receive side.
/// TSO without GUEST_CSUM breaks the spec's dependency and is not set.
pub fn tap_offloads_for(acked_features: u64) -> TapOffloads {
    let csum = acked_features & GUEST_CSUM != 0;
    TapOffloads {
        csum,
        tso4: csum && acked_features & GUEST_TSO4 != 0,
        tso6: csum && acked_features & GUEST_TSO6 != 0,
    }
}

/// Reads the configuration space at `offset`; bytes past its end read 0.
pub fn read_config(config: &NetConfig, offset: u64, data: &mut [u8]) {
    let mut space = [0u8; CONFIG_SPACE_LEN];
    space[0..6].copy_from_slice(&config.mac);
    // The link is always up; only a driver that negotiated
    // VIRTIO_NET_F_STATUS reads this, and it is not offered.
    space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    space[8..10].copy_from_slice(&1u16.to_le_bytes());
    space[10..12].copy_from_slice(&config.mtu.to_le_bytes());
    for (i, byte) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset)
            .ok()
            .and_then(|offset| offset.checked_add(i));
        *byte = at.and_then(|at| space.get(at)).copied().unwrap_or(0);
    }
}

/// The device's counters, shared by every model it runs (plain atomics:
/// only the model writes them, anyone may read).
#[derive(Debug, Default)]
pub struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_errors: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_errors: AtomicU64,
    rx_dropped: AtomicU64,
}

impl Counters {
    /// The counts so far.
    pub fn snapshot(&self) -> NetStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        NetStats {
            tx_packets: load(&self.tx_packets),
            tx_bytes: load(&self.tx_bytes),
            tx_errors: load(&self.tx_errors),
            rx_packets: load(&self.rx_packets),
            rx_bytes: load(&self.rx_bytes),
            rx_errors: load(&self.rx_errors),
            rx_dropped: load(&self.rx_dropped),
        }
    }
}

fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// What a pump did, so the adapter knows whom to notify and whether to
/// come back without waiting for an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PumpOutcome {
    /// The receive queue has used buffers the driver must be told about.
    pub rx_used: bool,
    /// The transmit queue has used buffers the driver must be told about.
    pub tx_used: bool,
    /// A direction stopped at [`PUMP_BUDGET`]: pump again (both ways).
    pub more: bool,
}

/// A contiguous run of guest memory named by one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Why a descriptor chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    /// A transmit chain contained a device-writable descriptor.
    #[error("tx chain {head} has a device-writable descriptor")]
    WritableInTx { head: u16 },
    /// A receive chain contained a device-readable descriptor.
    #[error("rx chain {head} has a device-readable descriptor")]
    ReadableInRx { head: u16 },
    /// A descriptor points outside guest memory.
    #[error("chain {head} points outside guest memory at {addr:#x} (+{len})")]
    BadAddress { head: u16, addr: u64, len: usize },
    /// The chain has more descriptors than any driver uses.
    #[error("chain {head} has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors { head: u16 },
    /// A transmit chain is longer than the largest frame.
    #[error("tx chain {head} holds more than {max} bytes", max = VNET_HDR_LEN + MAX_FRAME_LEN)]
    TooLong { head: u16 },
    /// A transmit chain cannot hold a header and an Ethernet header.
    #[error("tx chain {head} holds {len} bytes, less than a virtio-net and an Ethernet header")]
    TooShort { head: u16, len: usize },
    /// A receive chain cannot hold the virtio-net header.
    #[error("rx chain {head} holds {len} bytes, less than the {VNET_HDR_LEN}-byte header")]
    RxTooSmall { head: u16, len: usize },
    /// A transmit header asks for an offload the driver did not negotiate.
    #[error("tx chain {head} asks for offloads the driver did not negotiate (flags {flags:#x}, gso_type {gso_type:#x})")]
    UnnegotiatedOffload { head: u16, flags: u8, gso_type: u8 },
}

/// Why a transmit chain did not reach the TAP.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The TAP refused the frame (a header the kernel rejects, say).
    #[error("the TAP refused a {len}-byte frame from tx chain {head}: {source}")]
    Tap {
        head: u16,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// Appends the non-empty descriptors of `chain` to `segments`, checking
/// that each goes the expected way and lies in guest memory. Returns the
/// chain's total length; on error `segments` may hold part of the chain.
fn collect_segments<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    device_writable: bool,
    max_len: usize,
    segments: &mut Vec<Segment>,
) -> Result<usize, ChainError> {
    let head = chain.head_index();
    let mut total = 0usize;
    let mut descriptors = 0usize;
    for desc in chain {
        if desc.is_write_only() != device_writable {
            return Err(if device_writable {
                ChainError::ReadableInRx { head }
            } else {
                ChainError::WritableInTx { head }
            });
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        descriptors += 1;
        if descriptors > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors { head });
        }
        // At most 64 lengths of at most 4 GiB: no overflow on 64 bits.
        total += len;
        if total > max_len {
            return Err(ChainError::TooLong { head });
        }
        if !mem.check_range(desc.addr(), len) {
            return Err(ChainError::BadAddress {
                head,
                addr: desc.addr().0,
                len,
            });
        }
        segments.push(Segment {
            addr: desc.addr(),
            len,
        });
    }
    Ok(total)
}

/// The segments from byte `offset` on, each with how much of its start to
/// skip.
fn segments_from(
    segments: &[Segment],
    mut offset: usize,
) -> impl Iterator<Item = (Segment, usize)> + '_ {
    segments.iter().filter_map(move |&segment| {
        if offset >= segment.len {
            offset -= segment.len;
            None
        } else {
            let skip = offset;
            offset = 0;
            Some((segment, skip))
        }
    })
}

/// Copies `dst.len()` bytes from the start of `segments`.
fn read_bytes<M: GuestMemory>(mem: &M, segments: &[Segment], dst: &mut [u8]) -> bool {
    let mut done = 0;
    for segment in segments {
        if done == dst.len() {
            break;
        }
        let n = segment.len.min(dst.len() - done);
        if mem
            .read_slice(&mut dst[done..done + n], segment.addr)
            .is_err()
        {
            return false;
        }
        done += n;
    }
    done == dst.len()
}

/// Copies `src` to the start of `segments`.
fn write_bytes<M: GuestMemory>(mem: &M, segments: &[Segment], src: &[u8]) -> bool {
    let mut done = 0;
    for segment in segments {
        if done == src.len() {
            break;
        }
        let n = segment.len.min(src.len() - done);
        if mem.write_slice(&src[done..done + n], segment.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == src.len()
}

/// Whether a transmit header asks only for what the driver negotiated
/// (virtio 1.2, 5.1.6.2: NEEDS_CSUM needs CSUM; a GSO type needs its
/// HOST_TSO feature; DATA_VALID and RSC_INFO are receive-only; no UFO, no
/// ECN, since neither is offered).
fn tx_header_allowed(header: &[u8; VNET_HDR_LEN], acked_features: u64) -> bool {
    let (flags, gso_type) = (u32::from(header[0]), u32::from(header[1]));
    let flags_ok = match flags {
        0 => true,
        VIRTIO_NET_HDR_F_NEEDS_CSUM => acked_features & CSUM != 0,
        _ => false,
    };
    let gso_ok = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => acked_features & HOST_TSO4 != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => acked_features & HOST_TSO6 != 0,
        _ => false,
    };
    flags_ok && gso_ok
}

/// Fits a header the TAP wrote to what the driver negotiated (virtio 1.2,
/// 5.1.6.3): without GUEST_CSUM the flags must be 0, and a frame that
/// still needs its checksum, or a GSO frame the driver cannot take,
/// cannot be delivered at all (false). The TAP produces neither once its
/// offloads match, but frames it queued under an earlier driver's
/// offloads may still be there.
fn fit_rx_header(header: &mut [u8], acked_features: u64) -> bool {
    let (flags, gso_type) = (u32::from(header[0]), u32::from(header[1]));
    let guest_csum = acked_features & GUEST_CSUM != 0;
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !guest_csum {
        return false;
    }
    let gso_ok = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => acked_features & GUEST_TSO4 != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => acked_features & GUEST_TSO6 != 0,
        _ => false,
    };
    if !gso_ok {
        return false;
    }
    header[0] = if guest_csum {
        (flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)) as u8
    } else {
        0
    };
    true
}

/// A receive chain taken from the ring and not yet used.
#[derive(Clone, Copy, Debug)]
struct HeldChain {
    head: u16,
    /// The ring position it was taken from.
    avail_index: u16,
    /// Its segments in [`RxState::segments`].
    first_segment: usize,
    segment_count: usize,
    capacity: usize,
}

/// The receive side: the frame waiting for buffers and, during one pump,
/// the buffers taken for it.
struct RxState {
    /// One frame as the TAP gave it, header first; allocated once.
    frame: Box<[u8]>,
    /// The length of the frame in `frame` not yet delivered.
    pending_len: Option<usize>,
    /// Chains taken for the pending frame, in ring order; empty between
    /// pumps.
    held: Vec<HeldChain>,
    segments: Vec<Segment>,
    /// Whether a chain taken after `held[0]` was already used (a malformed
    /// one returned at once), so the ring cannot be rewound to `held[0]`.
    used_after_first_held: bool,
    /// Whether the TAP may have frames (no EAGAIN since the last edge or
    /// kick).
    tap_readable: bool,
}

impl RxState {
    fn new() -> Self {
        Self {
            frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            pending_len: None,
            held: Vec::new(),
            segments: Vec::new(),
            used_after_first_held: false,
            // Frames may have queued before the device was watching.
            tap_readable: true,
        }
    }

    fn held_capacity(&self) -> usize {
        self.held.iter().map(|chain| chain.capacity).sum()
    }

    /// Forgets the first `count` held chains (they were used).
    fn release(&mut self, count: usize) {
        let segments_used = self.held[..count]
            .iter()
            .map(|chain| chain.segment_count)
            .sum::<usize>();
        self.held.drain(..count);
        self.segments.drain(..segments_used);
        for chain in &mut self.held {
            chain.first_segment -= segments_used;
        }
        if self.held.is_empty() {
            self.used_after_first_held = false;
        }
    }

    fn forget_held(&mut self) {
        self.held.clear();
        self.segments.clear();
        self.used_after_first_held = false;
    }
}

/// What one read of the TAP produced.
enum TapRead {
    /// A deliverable frame of this many bytes (header included).
    Frame(usize),
    /// A frame the guest cannot take; it is counted and gone.
    Dropped,
    /// Nothing (EAGAIN), or a read error: wait for the next edge or kick.
    Empty,
}

/// Whether the receive ring produced enough buffers for the pending frame.
enum Collected {
    /// Enough buffers are held (or no more can ever come): deliver or drop.
    Ready,
    /// The ring is empty: wait for the driver's kick.
    OutOfBuffers,
}

/// A running net device: the TAP, the negotiated features and the frames
/// in flight.
pub struct NetModel {
    tap: Arc<dyn FrameDevice>,
    acked_features: u64,
    counters: Arc<Counters>,
    guest_log: GuestLog,
    tx_segments: Vec<Segment>,
    rx: RxState,
}

impl NetModel {
    /// A model over `tap`, counting into `counters` and logging
    /// guest-triggered lines on `guest_log` (both kept by the adapter for
    /// the device's whole life). No features are acked yet.
    pub fn new(tap: Arc<dyn FrameDevice>, counters: Arc<Counters>, guest_log: GuestLog) -> Self {
        Self {
            tap,
            acked_features: 0,
            counters,
            guest_log,
            tx_segments: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            rx: RxState::new(),
        }
    }

    /// The device's budget for guest-triggered log lines.
    pub fn guest_log(&self) -> &GuestLog {
        &self.guest_log
    }

    /// The TAP's name, for logs and thread names.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The TAP's fd, for the adapter to watch (edge-triggered: the model
    /// reads until EAGAIN before it relies on the next edge).
    pub fn tap_fd(&self) -> RawFd {
        self.tap.frame_fd().as_raw_fd()
    }

    /// Starts a driver session with `features`: sets the TAP's offloads to
    /// what the driver takes. A frame still waiting for buffers was fitted
    /// to the earlier session's features, so it is dropped and counted.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
        if self.rx.pending_len.take().is_some() {
            count(&self.counters.rx_dropped, 1);
        }
        let offloads = tap_offloads_for(features).intersect(self.tap.supported_offloads());
        if let Err(error) = self.tap.set_offloads(offloads) {
            // A driver can renegotiate at will, so the line is rate-limited.
            // Frames the TAP then delivers are still checked against the
            // driver's features (fit_rx_header).
            guest_warn!(self.guest_log, %error, tap = self.tap.name(), ?offloads, "cannot set the TAP's offloads");
        }
    }

    /// Runs transmit, then receive when frames wait or the TAP may be
    /// readable; `rx_event` says the receive queue was kicked or the TAP
    /// turned readable. Transmit is serviced on every call, whatever woke
    /// the adapter: a kick can be lost (vhost-user-backend drops one that
    /// arrives before the frontend enables the ring, and with EVENT_IDX the
    /// driver then kicks no more), and looking at an empty ring is cheap.
    /// A queue the driver has not made ready is left alone.
    pub fn pump<M: GuestMemory>(
        &mut self,
        mem: &M,
        rx_queue: &mut Queue,
        tx_queue: &mut Queue,
        rx_event: bool,
    ) -> Result<PumpOutcome, NetError> {
        let mut outcome = PumpOutcome::default();
        if tx_queue.ready() {
            let (used, more) = self.process_tx(tx_queue, mem)?;
            outcome.tx_used = used;
            outcome.more |= more;
        }
        if rx_event {
            self.rx.tap_readable = true;
        }
        if rx_queue.ready() && (self.rx.tap_readable || self.rx.pending_len.is_some()) {
            let (used, more) = self.process_rx(rx_queue, mem)?;
            outcome.rx_used = used;
            outcome.more |= more;
        }
        Ok(outcome)
    }

    /// Sends the transmit queue's frames to the TAP, up to the budget.
    /// Returns whether the driver must be notified and whether work is left.
    fn process_tx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<(bool, bool), NetError> {
        let queue_error = |source| NetError::Queue {
            queue: TX_QUEUE_INDEX,
            source,
        };
        let mut used_any = false;
        let mut budget = PUMP_BUDGET;
        let mut more = false;
        loop {
            queue.disable_notification(mem).map_err(queue_error)?;
            loop {
                if budget == 0 {
                    more = true;
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                match self.transmit(mem, chain) {
                    Ok(frame_len) => {
                        count(&self.counters.tx_packets, 1);
                        count(&self.counters.tx_bytes, frame_len);
                    }
                    Err(error) => {
                        count(&self.counters.tx_errors, 1);
                        guest_warn!(self.guest_log, %error, "dropping a virtio-net tx frame");
                    }
                }
                // The device never writes a transmit buffer (virtio 1.2,
                // 5.1.6.2.1): its used length is 0 whatever happened.
                queue.add_used(mem, head, 0).map_err(queue_error)?;
                used_any = true;
            }
            // Re-check after enabling notifications (virtio 1.2, 2.7.10).
            if more || !rearm_and_recheck(queue, mem).map_err(queue_error)? {
                break;
            }
        }
        let notify = used_any && queue.needs_notification(mem).map_err(queue_error)?;
        Ok((notify, more))
    }

    /// Writes one transmit chain to the TAP; returns the frame's length.
    fn transmit<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<usize, TxError> {
        let head = chain.head_index();
        self.tx_segments.clear();
        let total = collect_segments(
            mem,
            chain,
            false,
            VNET_HDR_LEN + MAX_FRAME_LEN,
            &mut self.tx_segments,
        )?;
        if total < VNET_HDR_LEN + ETH_HLEN {
            return Err(ChainError::TooShort { head, len: total }.into());
        }
        // The header is checked and sent from this copy (see the module
        // documentation).
        let mut header = [0u8; VNET_HDR_LEN];
        if !read_bytes(mem, &self.tx_segments, &mut header) {
            let first = self.tx_segments.first().copied();
            return Err(ChainError::BadAddress {
                head,
                addr: first.map_or(0, |s| s.addr.0),
                len: VNET_HDR_LEN,
            }
            .into());
        }
        if !tx_header_allowed(&header, self.acked_features) {
            return Err(ChainError::UnnegotiatedOffload {
                head,
                flags: header[0],
                gso_type: header[1],
            }
            .into());
        }
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        iovecs[0] = libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: VNET_HDR_LEN,
        };
        let mut count = 1;
        for (segment, skip) in segments_from(&self.tx_segments, VNET_HDR_LEN) {
            let start = GuestAddress(segment.addr.0 + skip as u64);
            // A descriptor may straddle two memory regions: get_slices
            // splits it.
            for slice in mem.get_slices(start, segment.len - skip) {
                let slice = slice.map_err(|_| ChainError::BadAddress {
                    head,
                    addr: start.0,
                    len: segment.len - skip,
                })?;
                let Some(iovec) = iovecs.get_mut(count) else {
                    return Err(ChainError::TooManyDescriptors { head }.into());
                };
                *iovec = libc::iovec {
                    // The pointer stays valid after the guard is dropped:
                    // the region stays mapped while `mem` is borrowed,
                    // which outlives the writev below.
                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: slice.len(),
                };
                count += 1;
            }
        }
        let written = loop {
            // SAFETY: the iovecs point at `header` (a live local) and at
            // guest memory checked to be mapped and borrowed for this call;
            // writev only reads them.
            let ret = unsafe {
                libc::writev(
                    self.tap.frame_fd().as_raw_fd(),
                    iovecs.as_ptr(),
                    count as libc::c_int,
                )
            };
            if ret >= 0 {
                break ret as usize;
            }
            let source = io::Error::last_os_error();
            if source.kind() != io::ErrorKind::Interrupted {
                return Err(TxError::Tap {
                    head,
                    len: total - VNET_HDR_LEN,
                    source,
                });
            }
        };
        if written != total {
            return Err(TxError::Tap {
                head,
                len: total - VNET_HDR_LEN,
                source: io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("the TAP took {written} of {total} bytes"),
                ),
            });
        }
        Ok(total - VNET_HDR_LEN)
    }

    /// Delivers frames from the TAP into the receive queue, up to the
    /// budget of reads. Returns whether the driver must be notified and
    /// whether work is left.
    fn process_rx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<(bool, bool), NetError> {
        let queue_error = |source| NetError::Queue {
            queue: RX_QUEUE_INDEX,
            source,
        };
        let mergeable = self.acked_features & MRG_RXBUF != 0;
        let mut used_any = false;
        let mut budget = PUMP_BUDGET;
        let mut more = false;
        loop {
            queue.disable_notification(mem).map_err(queue_error)?;
            let mut out_of_buffers = false;
            loop {
                let Some(len) = self.rx.pending_len else {
                    if !self.rx.tap_readable {
                        break;
                    }
                    if budget == 0 {
                        more = true;
                        break;
                    }
                    budget -= 1;
                    match self.read_frame() {
                        TapRead::Frame(len) => self.rx.pending_len = Some(len),
                        TapRead::Dropped => {}
                        TapRead::Empty => break,
                    }
                    continue;
                };
                match self.collect_rx_buffers(queue, mem, len, mergeable, &mut used_any)? {
                    Collected::Ready => self.deliver(queue, mem, len, &mut used_any)?,
                    Collected::OutOfBuffers => {
                        out_of_buffers = true;
                        break;
                    }
                }
            }
            // Ask for a kick only when a frame waits for buffers, and
            // re-check after enabling (virtio 1.2, 2.7.10).
            if !out_of_buffers || !rearm_and_recheck(queue, mem).map_err(queue_error)? {
                break;
            }
        }
        // After the notification is enabled: with EVENT_IDX it asks for a
        // kick at the ring's end, past the chains handed back here.
        self.hand_back_held(queue, mem, &mut used_any)?;
        let notify = used_any && queue.needs_notification(mem).map_err(queue_error)?;
        Ok((notify, more))
    }

    /// Ends a pump with no chain taken: rewinds the ring to the first held
    /// chain, so they are taken again next time, or, when a chain after it
    /// was already used, returns them empty (only a driver that posts
    /// malformed chains among good ones gets there).
    fn hand_back_held<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        used_any: &mut bool,
    ) -> Result<(), NetError> {
        let Some(first) = self.rx.held.first() else {
            return Ok(());
        };
        if !self.rx.used_after_first_held {
            queue.set_next_avail(first.avail_index);
        } else {
            for chain in &self.rx.held {
                queue
                    .add_used(mem, chain.head, 0)
                    .map_err(|source| NetError::Queue {
                        queue: RX_QUEUE_INDEX,
                        source,
                    })?;
            }
            *used_any = true;
        }
        self.rx.forget_held();
        Ok(())
    }

    /// Reads one frame from the TAP into the frame buffer.
    fn read_frame(&mut self) -> TapRead {
        let fd = self.tap.frame_fd().as_raw_fd();
        let read = loop {
            // SAFETY: the buffer is ours, live and `len` bytes long.
            let ret =
                unsafe { libc::read(fd, self.rx.frame.as_mut_ptr().cast(), self.rx.frame.len()) };
            if ret >= 0 {
                break ret as usize;
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.rx.tap_readable = false;
                    return TapRead::Empty;
                }
                _ => {
                    // A frame too large for the buffer fails the read and is
                    // gone; the next edge or kick reads on. The rate limit
                    // holds a persistent error (the interface deleted) down.
                    count(&self.counters.rx_errors, 1);
                    self.rx.tap_readable = false;
                    guest_warn!(self.guest_log, %error, tap = self.tap.name(), "cannot read from the TAP");
                    return TapRead::Empty;
                }
            }
        };
        if read < VNET_HDR_LEN + ETH_HLEN {
            count(&self.counters.rx_errors, 1);
            return TapRead::Dropped;
        }
        if !fit_rx_header(&mut self.rx.frame[..VNET_HDR_LEN], self.acked_features) {
            count(&self.counters.rx_dropped, 1);
            return TapRead::Dropped;
        }
        TapRead::Frame(read)
    }

    /// Takes receive chains from the ring until the held ones can take
    /// `len` bytes (one chain without mergeable buffers). Malformed chains
    /// are returned at once, with length 0: a driver given one with
    /// `num_buffers` of a frame would read the frame wrong.
    fn collect_rx_buffers<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        len: usize,
        mergeable: bool,
        used_any: &mut bool,
    ) -> Result<Collected, NetError> {
        loop {
            if !self.rx.held.is_empty() && (!mergeable || self.rx.held_capacity() >= len) {
                return Ok(Collected::Ready);
            }
            // Every descriptor of the ring is held and the frame still does
            // not fit: no more can come, so `deliver` drops it.
            if self.rx.segments.len() >= usize::from(queue.size()) {
                return Ok(Collected::Ready);
            }
            let avail_index = queue.next_avail();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Ok(Collected::OutOfBuffers);
            };
            let head = chain.head_index();
            let first_segment = self.rx.segments.len();
            let collected = collect_segments(mem, chain, true, usize::MAX, &mut self.rx.segments)
                .and_then(|capacity| {
                    if capacity < VNET_HDR_LEN {
                        Err(ChainError::RxTooSmall {
                            head,
                            len: capacity,
                        })
                    } else {
                        Ok(capacity)
                    }
                });
            match collected {
                Ok(capacity) => self.rx.held.push(HeldChain {
                    head,
                    avail_index,
                    first_segment,
                    segment_count: self.rx.segments.len() - first_segment,
                    capacity,
                }),
                Err(error) => {
                    self.rx.segments.truncate(first_segment);
                    self.rx.used_after_first_held |= !self.rx.held.is_empty();
                    count(&self.counters.rx_errors, 1);
                    guest_warn!(self.guest_log, %error, "returning an unusable virtio-net rx buffer");
                    queue
                        .add_used(mem, head, 0)
                        .map_err(|source| NetError::Queue {
                            queue: RX_QUEUE_INDEX,
                            source,
                        })?;
                    *used_any = true;
                }
            }
        }
    }

    /// Copies the pending frame (`len` bytes) into the first held chains
    /// that hold it, or drops it if they cannot.
    fn deliver<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        len: usize,
        used_any: &mut bool,
    ) -> Result<(), NetError> {
        self.rx.pending_len = None;
        let mergeable = self.acked_features & MRG_RXBUF != 0;
        let mut chains = 0;
        let mut capacity = 0;
        for chain in &self.rx.held {
            chains += 1;
            capacity += chain.capacity;
            if capacity >= len || !mergeable {
                break;
            }
        }
        if capacity < len {
            // Larger than the driver's buffers: its MTU is smaller than the
            // host side's, or its ring cannot hold the frame. The buffers
            // stay for the next frame.
            count(&self.counters.rx_dropped, 1);
            return Ok(());
        }
        // At most one chain per ring descriptor, so at most 1024.
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        self.rx.frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let mut written_ok = true;
        let mut offset = 0;
        for chain in &self.rx.held[..chains] {
            let n = chain.capacity.min(len - offset);
            let segments =
                &self.rx.segments[chain.first_segment..chain.first_segment + chain.segment_count];
            written_ok &= write_bytes(mem, segments, &self.rx.frame[offset..offset + n]);
            offset += n;
        }
        // Counted before the driver can see the chains.
        if written_ok {
            count(&self.counters.rx_packets, 1);
            count(&self.counters.rx_bytes, len - VNET_HDR_LEN);
        } else {
            // Guest memory refused a write its range check allowed (it
            // cannot change during a pump, which holds one snapshot of it):
            // the chains go back empty.
            count(&self.counters.rx_errors, 1);
            guest_warn!(self.guest_log, "a virtio-net rx buffer left guest memory");
        }
        let mut offset = 0;
        for chain in &self.rx.held[..chains] {
            let n = chain.capacity.min(len - offset);
            offset += n;
            // n <= len <= VNET_HDR_LEN + MAX_FRAME_LEN, which fits a u32.
            let used_len = if written_ok { n as u32 } else { 0 };
            queue
                .add_used(mem, chain.head, used_len)
                .map_err(|source| NetError::Queue {
                    queue: RX_QUEUE_INDEX,
                    source,
                })?;
        }
        *used_any = true;
        self.rx.release(chains);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_are_offered_only_where_the_tap_supports_them() {
        assert_eq!(device_features(TapOffloads::NONE), BASE_FEATURES);
        let csum_only = device_features(TapOffloads {
            csum: true,
            ..TapOffloads::NONE
        });
        assert_eq!(csum_only, BASE_FEATURES | CSUM | GUEST_CSUM);
        let all = device_features(TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        });
        assert_eq!(
            all,
            BASE_FEATURES | CSUM | GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | GUEST_TSO4 | GUEST_TSO6
        );
        // TSO without checksum offload is never offered.
        assert_eq!(
            device_features(TapOffloads {
                csum: false,
                tso4: true,
                tso6: true,
            }),
            BASE_FEATURES
        );
    }

    #[test]
    fn tap_offloads_follow_the_guest_receive_features_acked() {
        assert_eq!(tap_offloads_for(CSUM | HOST_TSO4), TapOffloads::NONE);
        assert_eq!(
            tap_offloads_for(GUEST_CSUM | GUEST_TSO6),
            TapOffloads {
                csum: true,
                tso4: false,
                tso6: true,
            }
        );
        assert_eq!(tap_offloads_for(GUEST_TSO4), TapOffloads::NONE);
    }

    #[test]
    fn tx_headers_may_only_ask_for_negotiated_offloads() {
        let header = |flags: u32, gso: u32| {
            let mut h = [0u8; VNET_HDR_LEN];
            h[0] = flags as u8;
            h[1] = gso as u8;
            h
        };
        assert!(tx_header_allowed(&header(0, 0), 0));
        assert!(!tx_header_allowed(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0),
            0
        ));
        assert!(tx_header_allowed(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0),
            CSUM
        ));
        assert!(!tx_header_allowed(
            &header(VIRTIO_NET_HDR_F_DATA_VALID, 0),
            CSUM
        ));
        assert!(!tx_header_allowed(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4),
            CSUM
        ));
        assert!(tx_header_allowed(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4),
            CSUM | HOST_TSO4
        ));
        assert!(!tx_header_allowed(
            &header(
                VIRTIO_NET_HDR_F_NEEDS_CSUM,
                VIRTIO_NET_HDR_GSO_TCPV4 | virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_ECN
            ),
            CSUM | HOST_TSO4
        ));
    }

    #[test]
    fn rx_headers_are_fitted_to_the_driver_or_refused() {
        let mut valid = [VIRTIO_NET_HDR_F_DATA_VALID as u8, 0, 0, 0];
        assert!(fit_rx_header(&mut valid, 0));
        assert_eq!(valid[0], 0, "flags are 0 without GUEST_CSUM");
        let mut partial = [VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0];
        assert!(!fit_rx_header(&mut partial, 0));
        assert!(fit_rx_header(&mut partial, GUEST_CSUM));
        let mut gso = [
            VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            VIRTIO_NET_HDR_GSO_TCPV6 as u8,
        ];
        assert!(!fit_rx_header(&mut gso, GUEST_CSUM | GUEST_TSO4));
        assert!(fit_rx_header(&mut gso, GUEST_CSUM | GUEST_TSO6));
    }

    #[test]
    fn config_space_holds_mac_status_and_mtu_and_reads_zero_past_its_end() {
        let config = NetConfig {
            mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
            mtu: 9000,
        };
        let mut space = [0xffu8; 16];
        read_config(&config, 0, &mut space);
        assert_eq!(&space[0..6], &config.mac);
        assert_eq!(u16::from_le_bytes([space[6], space[7]]), 1, "LINK_UP");
        assert_eq!(u16::from_le_bytes([space[10], space[11]]), 9000);
        assert_eq!(&space[12..], &[0, 0, 0, 0]);
        let mut mtu = [0u8; 2];
        read_config(&config, 10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 9000);
        let mut far = [0xffu8; 2];
        read_config(&config, u64::MAX, &mut far);
        assert_eq!(far, [0, 0]);
    }
}
