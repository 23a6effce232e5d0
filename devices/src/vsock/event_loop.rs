//! What wakes the device: the worker thread of an activated MMIO device.
//!
//! One thread per activated device, blocked in epoll on the three queue
//! eventfds (KVM ioeventfds), the model's host-side epoll fd and a stop
//! eventfd; it runs the [`VsockModel`] on each wake-up and raises the
//! interrupt when the model used buffers. Stopping joins the thread, which
//! hands back the model and where the queues stand ([`PausedWorker`]):
//! dropping it closes every connection, while a pause for a snapshot keeps
//! it to start again with. (Over vhost-user the
//! framework's vring worker plays this part, see [`super::vhost_user`].)

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::QueueState;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::model::VsockModel;
use super::{VsockError, EVENT_QUEUE_INDEX, RX_QUEUE_INDEX, TX_QUEUE_INDEX};
use crate::guest_log::guest_warn;
use crate::worker::{queue_epoll, queue_states, DeviceWorker, StopEvent};
use crate::{ActivatedQueue, VirtioInterrupt};

/// Epoll tokens of the MMIO worker.
const TOKEN_RX: u64 = RX_QUEUE_INDEX as u64;
const TOKEN_TX: u64 = TX_QUEUE_INDEX as u64;
const TOKEN_EVENT: u64 = EVENT_QUEUE_INDEX as u64;
const TOKEN_MUXER: u64 = 3;
const TOKEN_STOP: u64 = 4;
/// Events fetched per wait; the worker watches five fds.
const WORKER_EVENTS: usize = 8;

/// The thread that runs an activated MMIO vsock device: stopped, it
/// hands back its model and queue positions ([`DeviceWorker`]).
pub type MmioWorker = DeviceWorker<PausedWorker>;

/// What a worker stopped by its stop event hands back: the model, with
/// its listener and connections, and where each queue stands. Dropping
/// it closes every connection.
pub struct PausedWorker {
    pub model: VsockModel,
    pub queues: Vec<QueueState>,
}

struct WorkerState {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActivatedQueue>,
    model: VsockModel,
    epoll: Epoll,
}

/// Starts the worker thread running `model` over the activated queues
/// (rx, tx, event).
pub fn spawn_worker(
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActivatedQueue>,
    model: VsockModel,
    guest_cid: u64,
) -> Result<MmioWorker, VsockError> {
    let event_error = |what| move |source| VsockError::Event { what, source };
    let stop = StopEvent::new().map_err(event_error("worker stop eventfd"))?;
    let epoll = queue_epoll(&queues, &stop, TOKEN_STOP).map_err(event_error(
        "worker epoll with the queue notifiers and the stop eventfd",
    ))?;
    epoll
        .ctl(
            ControlOperation::Add,
            model.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_MUXER),
        )
        .map_err(event_error("register muxer"))?;
    let name = format!("vsock-cid{guest_cid}");
    let mut state = WorkerState {
        memory,
        interrupt,
        queues,
        model,
        epoll,
    };
    DeviceWorker::spawn(name.clone(), stop, move || {
        if !state.run() {
            return None;
        }
        Some(PausedWorker {
            queues: queue_states(&state.queues),
            model: state.model,
        })
    })
    .map_err(|source| VsockError::Thread { name, source })
}

impl WorkerState {
    /// Runs until the stop event (`true`) or a failure (`false`).
    fn run(&mut self) -> bool {
        let mut events = [EpollEvent::default(); WORKER_EVENTS];
        // A first pass over both queues: the driver may have posted and
        // notified before this worker existed (before DRIVER_OK reached
        // it, or while a paused worker was stopped), and a notification
        // read then is not repeated.
        let (mut run_tx, mut run_rx) = (true, true);
        loop {
            if let Err(error) = self.pump(run_tx, run_rx) {
                // A broken ring is the driver's doing, and a reset brings the
                // device back to fail again: rate-limited.
                guest_warn!(self.model.guest_log(), %error, "vsock queue processing failed; device stops");
                return false;
            }
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    (run_tx, run_rx) = (false, false);
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, "vsock worker epoll_wait failed; device stops");
                    return false;
                }
            };
            (run_tx, run_rx) = (false, false);
            let mut stopping = false;
            for event in &events[..count] {
                match event.data() {
                    // The rest of the batch is handled first: a notifier
                    // read here but not pumped would be lost to a pause.
                    TOKEN_STOP => stopping = true,
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
                        self.model.process_host_events();
                        run_rx = true;
                    }
                    _ => {}
                }
            }
            if stopping {
                if let Err(error) = self.pump(run_tx, run_rx) {
                    guest_warn!(self.model.guest_log(), %error, "vsock queue processing failed; device stops");
                    return false;
                }
                return true;
            }
        }
    }

    fn drain_notifier(&self, index: usize) {
        if let Some(queue) = self.queues.get(index) {
            // EAGAIN only means a previous read already consumed the count.
            let _ = queue.notifier.read();
        }
    }

    /// Runs the model on the queues and interrupts the guest if it used
    /// buffers in either.
    fn pump(&mut self, run_tx: bool, run_rx: bool) -> Result<(), VsockError> {
        let [rx_queue, tx_queue, ..] = self.queues.as_mut_slice() else {
            return Ok(());
        };
        let used = self.model.pump(
            &self.memory,
            &mut rx_queue.queue,
            &mut tx_queue.queue,
            run_tx,
            run_rx,
        )?;
        if used.rx || used.tx {
            if let Err(error) = self.interrupt.signal_used_queue() {
                tracing::warn!(%error, "cannot interrupt the guest for vsock");
            }
        }
        Ok(())
    }
}
