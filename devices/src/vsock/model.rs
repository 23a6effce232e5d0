//! The vsock device model, written once for both transports.
//!
//! The driver negotiates [`DEVICE_FEATURES`] and reads the configuration
//! space ([`read_config`]: the guest's CID); once the device runs, a
//! [`VsockModel`] moves its packets: [`VsockModel::pump`] runs the tx and
//! rx queues against the [`Muxer`] (the host side). [`QueueProcessor`] does the queue
//! work: it drains the tx queue into the muxer and fills rx buffers from it,
//! in batches, and tells its caller whether the driver must be notified. It
//! works on a plain `virtio_queue::Queue` and any `GuestMemory`.
//!
//! Each adapter owns the threads and the notification plumbing: the MMIO
//! device's worker ([`super::event_loop`]) and the vhost-user backend
//! ([`super::vhost_user`]) call the model when a queue is kicked or a host
//! socket is ready, and signal the driver as the model says.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::muxer::Muxer;
use super::packet::{self, RxBuffer, Segment, TxPayload};
use super::{
    VsockConfig, VsockError, VsockTimeouts, RX_QUEUE_INDEX, TX_QUEUE_INDEX, VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log::{guest_warn, GuestLog};
use crate::virtio::rearm_and_recheck;

/// Size of the vsock configuration space: `le64 guest_cid` (virtio 1.2, 5.10.4).
pub const CONFIG_SPACE_LEN: usize = 8;
/// The feature bits the device offers besides VIRTIO_F_VERSION_1 (which each
/// transport adds).
pub const DEVICE_FEATURES: u64 = VIRTIO_RING_F_EVENT_IDX;

/// Reads the configuration space of the device the guest `guest_cid` sees,
/// at `offset`; bytes past its end read 0.
pub fn read_config(guest_cid: u64, offset: u64, data: &mut [u8]) {
    let config: [u8; CONFIG_SPACE_LEN] = guest_cid.to_le_bytes();
    for (i, byte) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset)
            .ok()
            .and_then(|offset| offset.checked_add(i));
        *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
    }
}

/// Which queues a pump put buffers in, so the adapter knows whom to notify.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedQueues {
    /// The rx queue has used buffers the driver must be told about.
    pub rx: bool,
    /// The tx queue has used buffers the driver must be told about.
    pub tx: bool,
}

/// A running vsock device: its host side and the packets in flight.
pub struct VsockModel {
    muxer: Muxer,
    processor: QueueProcessor,
}

impl VsockModel {
    /// A device for `config` whose host side accepts clients on a clone of
    /// `listener`: the adapter binds the socket once, when it is created, so
    /// host clients wait in its backlog until a driver session starts.
    ///
    /// Guest-triggered warnings go to `guest_log`, which the adapter keeps
    /// for the device's whole life (a new model per driver session must not
    /// mean a fresh budget).
    pub fn new(
        config: &VsockConfig,
        timeouts: VsockTimeouts,
        listener: &UnixListener,
        guest_log: GuestLog,
    ) -> Result<Self, VsockError> {
        let listener = listener.try_clone().map_err(|source| VsockError::Bind {
            path: config.uds_path.clone(),
            source,
        })?;
        Ok(Self {
            muxer: Muxer::new(config, timeouts, listener, guest_log)?,
            processor: QueueProcessor::default(),
        })
    }

    /// Accepts host clients, reads host sockets and runs timers: whatever
    /// woke the muxer's epoll fd. Call [`Self::pump`] with `run_rx` after.
    pub fn process_host_events(&mut self) {
        self.muxer.process_host_events();
    }

    /// The device's budget for guest-triggered log lines.
    pub fn guest_log(&self) -> &GuestLog {
        self.muxer.guest_log()
    }

    /// Drops every connection: a new driver session (SET_FEATURES over
    /// vhost-user) knows nothing of the old one's sockets.
    pub fn reset_connections(&mut self) {
        self.muxer.reset_connections();
    }

    /// Runs tx (which may queue replies) and/or rx, and retries tx while rx
    /// frees the backlog it stalled on. A queue the driver has not made
    /// ready is left alone.
    pub fn pump<M: GuestMemory>(
        &mut self,
        mem: &M,
        rx_queue: &mut Queue,
        tx_queue: &mut Queue,
        mut run_tx: bool,
        mut run_rx: bool,
    ) -> Result<UsedQueues, VsockError> {
        let Self { muxer, processor } = self;
        let mut used = UsedQueues::default();
        loop {
            if run_tx {
                if tx_queue.ready() {
                    used.tx |= processor.process_tx(tx_queue, mem, muxer)?;
                }
                run_rx = true;
            }
            if run_rx && rx_queue.ready() {
                used.rx |= processor.process_rx(rx_queue, mem, muxer)?;
            }
            // A stalled tx resumes once rx has drained the backlog.
            run_tx = processor.tx_stalled() && !muxer.tx_backlog_full();
            if !run_tx {
                break;
            }
        }
        Ok(used)
    }
}

impl AsRawFd for VsockModel {
    /// The muxer's epoll fd: readable when a host socket or timer needs
    /// [`VsockModel::process_host_events`].
    fn as_raw_fd(&self) -> RawFd {
        self.muxer.as_raw_fd()
    }
}

/// Moves packets between the queues and the muxer.
#[derive(Default)]
pub struct QueueProcessor {
    tx_segments: Vec<Segment>,
    rx_segments: Vec<Segment>,
    tx_stalled: bool,
}

impl QueueProcessor {
    /// Whether tx processing stopped early because the muxer's backlog of
    /// guest-bound packets is full; call [`Self::process_tx`] again after rx.
    pub fn tx_stalled(&self) -> bool {
        self.tx_stalled
    }

    /// Drains the tx queue into the muxer. Returns whether the driver must
    /// be notified of used buffers.
    pub fn process_tx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        muxer: &mut Muxer,
    ) -> Result<bool, VsockError> {
        let queue_error = |source| VsockError::Queue {
            queue: TX_QUEUE_INDEX,
            source,
        };
        self.tx_stalled = false;
        let mut used_any = false;
        loop {
            queue.disable_notification(mem).map_err(queue_error)?;
            loop {
                if muxer.tx_backlog_full() {
                    self.tx_stalled = true;
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                match packet::parse_tx(mem, chain, &mut self.tx_segments) {
                    Ok(header) => {
                        let payload_len = if header.op == packet::op::RW {
                            header.len as usize
                        } else {
                            0
                        };
                        let payload = TxPayload::new(mem, &self.tx_segments, payload_len);
                        muxer.handle_guest_packet(&header, &payload);
                    }
                    Err(error) => {
                        guest_warn!(muxer.guest_log(), %error, "dropping malformed vsock tx packet")
                    }
                }
                queue.add_used(mem, head, 0).map_err(queue_error)?;
                used_any = true;
            }
            if self.tx_stalled || !rearm_and_recheck(queue, mem).map_err(queue_error)? {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem).map_err(queue_error)?)
    }

    /// Fills rx buffers with the muxer's pending packets. Returns whether
    /// the driver must be notified of used buffers.
    pub fn process_rx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        muxer: &mut Muxer,
    ) -> Result<bool, VsockError> {
        let queue_error = |source| VsockError::Queue {
            queue: RX_QUEUE_INDEX,
            source,
        };
        let mut used_any = false;
        loop {
            queue.disable_notification(mem).map_err(queue_error)?;
            let mut out_of_buffers = false;
            while muxer.has_rx() {
                let before = queue.next_avail();
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                match packet::parse_rx(mem, chain, &mut self.rx_segments) {
                    Ok(total) => {
                        let rx = RxBuffer::new(mem, &self.rx_segments, total);
                        match muxer.fill_rx(&rx) {
                            Some(len) => {
                                queue.add_used(mem, head, len).map_err(queue_error)?;
                                used_any = true;
                            }
                            None => {
                                // Nothing after all (a socket had no data):
                                // hand the buffer back to the ring.
                                queue.set_next_avail(before);
                                break;
                            }
                        }
                    }
                    Err(error) => {
                        guest_warn!(muxer.guest_log(), %error, "returning unusable vsock rx buffer");
                        queue.add_used(mem, head, 0).map_err(queue_error)?;
                        used_any = true;
                    }
                }
            }
            // Ask to be told about new buffers only if we still have packets;
            // re-check after enabling (virtio 1.2, 2.7.10 race).
            if !out_of_buffers || !rearm_and_recheck(queue, mem).map_err(queue_error)? {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem).map_err(queue_error)?)
    }
}
