//! What wakes the device, and the queue processing both transports share.
//!
//! [`QueueProcessor`] moves packets between the virtqueues and the
//! [`Muxer`]: it drains the tx queue into the muxer and fills rx buffers from
//! it, in batches, and tells its caller whether the driver must be
//! interrupted. It works on a plain `virtio_queue::Queue` and any
//! `GuestMemory`, so the vhost-user adapter calls it with the vrings'
//! queues and the MMIO worker ([`MmioWorker`]) with its own.
//!
//! The MMIO worker is one thread per activated device, blocked in epoll on
//! the three queue eventfds (KVM ioeventfds), the muxer's epoll fd and a
//! stop eventfd. Stopping joins the thread and hands the muxer back.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{self, RxBuffer, Segment, TxPayload};
use super::{VsockError, EVENT_QUEUE_INDEX, RX_QUEUE_INDEX, TX_QUEUE_INDEX};
use crate::{ActivatedQueue, VirtioInterrupt};

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
                    Err(error) => tracing::warn!(%error, "dropping malformed vsock tx packet"),
                }
                queue.add_used(mem, head, 0).map_err(queue_error)?;
                used_any = true;
            }
            if self.tx_stalled || !queue.enable_notification(mem).map_err(queue_error)? {
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
                        tracing::warn!(%error, "returning unusable vsock rx buffer");
                        queue.add_used(mem, head, 0).map_err(queue_error)?;
                        used_any = true;
                    }
                }
            }
            // Ask to be told about new buffers only if we still have packets;
            // re-check after enabling (virtio 1.2, 2.7.10 race).
            if !out_of_buffers || !queue.enable_notification(mem).map_err(queue_error)? {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem).map_err(queue_error)?)
    }
}

/// Epoll tokens of the MMIO worker.
const TOKEN_RX: u64 = RX_QUEUE_INDEX as u64;
const TOKEN_TX: u64 = TX_QUEUE_INDEX as u64;
const TOKEN_EVENT: u64 = EVENT_QUEUE_INDEX as u64;
const TOKEN_MUXER: u64 = 3;
const TOKEN_STOP: u64 = 4;
/// Events fetched per wait; the worker watches five fds.
const WORKER_EVENTS: usize = 8;

/// The thread that runs an activated MMIO vsock device.
pub struct MmioWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

struct WorkerState {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActivatedQueue>,
    muxer: Muxer,
    processor: QueueProcessor,
    epoll: Epoll,
}

impl MmioWorker {
    /// Starts the worker thread over the activated queues (rx, tx, event).
    pub fn spawn(
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        muxer: Muxer,
        guest_cid: u64,
    ) -> Result<Self, VsockError> {
        let event_error = |what| move |source| VsockError::Event { what, source };
        let epoll = Epoll::new().map_err(event_error("worker epoll_create"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(event_error("worker stop eventfd"))?;
        for (token, queue) in queues.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    queue.notifier.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token as u64),
                )
                .map_err(event_error("register queue notifier"))?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                muxer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_MUXER),
            )
            .map_err(event_error("register muxer"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(event_error("register stop eventfd"))?;
        let name = format!("vsock-cid{guest_cid}");
        let mut state = WorkerState {
            memory,
            interrupt,
            queues,
            muxer,
            processor: QueueProcessor::default(),
            epoll,
        };
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || state.run())
            .map_err(|source| VsockError::Thread { name, source })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it; its connections are closed.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(error) = self.stop.write(1) {
                tracing::error!(%error, "cannot signal the vsock worker to stop");
            }
            if thread.join().is_err() {
                tracing::error!("the vsock worker thread panicked");
            }
        }
    }
}

impl Drop for MmioWorker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl WorkerState {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); WORKER_EVENTS];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::error!(%error, "vsock worker epoll_wait failed; device stops");
                    return;
                }
            };
            let mut run_tx = false;
            let mut run_rx = false;
            for event in &events[..count] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_RX => {
                        self.drain_notifier(RX_QUEUE_INDEX);
                        run_rx = true;
                    }
                    TOKEN_TX => {
                        self.drain_notifier(TX_QUEUE_INDEX);
                        run_tx = true;
                    }
                    // The event queue carries only TRANSPORT_RESET, which we
                    // never send; its buffers stay with us untouched.
                    TOKEN_EVENT => self.drain_notifier(EVENT_QUEUE_INDEX),
                    TOKEN_MUXER => {
                        self.muxer.process_host_events();
                        run_rx = true;
                    }
                    _ => {}
                }
            }
            if let Err(error) = self.pump(run_tx, run_rx) {
                tracing::error!(%error, "vsock queue processing failed; device stops");
                return;
            }
        }
    }

    fn drain_notifier(&self, index: usize) {
        if let Some(queue) = self.queues.get(index) {
            // EAGAIN only means a previous read already consumed the count.
            let _ = queue.notifier.read();
        }
    }

    /// Runs tx (which may queue replies) then rx, and retries tx while rx
    /// frees the backlog it stalled on.
    fn pump(&mut self, mut run_tx: bool, mut run_rx: bool) -> Result<(), VsockError> {
        let mut notify = false;
        let [rx_queue, tx_queue, ..] = self.queues.as_mut_slice() else {
            return Ok(());
        };
        loop {
            if run_tx {
                notify |= self.processor.process_tx(
                    &mut tx_queue.queue,
                    &self.memory,
                    &mut self.muxer,
                )?;
                run_rx = true;
            }
            if run_rx {
                notify |= self.processor.process_rx(
                    &mut rx_queue.queue,
                    &self.memory,
                    &mut self.muxer,
                )?;
            }
            // A stalled tx resumes once rx has drained the backlog.
            run_tx = self.processor.tx_stalled() && !self.muxer.tx_backlog_full();
            if !run_tx {
                break;
            }
        }
        if notify {
            if let Err(error) = self.interrupt.signal_used_queue() {
                tracing::warn!(%error, "cannot interrupt the guest for vsock");
            }
        }
        Ok(())
    }
}
