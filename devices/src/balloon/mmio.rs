//! The [`VirtioDevice`] adapter: how the built-in VMM's virtio-mmio
//! transport sees the balloon, and the worker thread that runs it.
//!
//! The device holds the configuration space (the driver's `actual`), the
//! acked features and the counters. `activate` starts a [`Worker`]: one
//! thread, confined as a device thread, blocked in epoll on the queue
//! eventfds (KVM ioeventfds) and a stop eventfd. Each wake-up runs one
//! [`BalloonQueues::pump`] over every queue, raises the interrupt when it
//! used buffers, and pumps again without sleeping while chains are left.
//! `reset` and drop stop and join the worker; the counters and the log
//! budget outlive it. `pause` stops it too, for a snapshot, and returns
//! where its queues stand; `activate` with those positions continues.

use std::sync::Arc;

use virtio_queue::QueueState;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::model::{ConfigSpace, Counters, DEVICE_FEATURES, VIRTIO_BALLOON_F_REPORTING};
use super::queues::BalloonQueues;
use super::{BalloonError, BalloonStats, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_BALLOON};
use crate::guest_log::{guest_warn, GuestLog};
use crate::worker::{queue_epoll, queue_states, DeviceWorker, StopEvent};
use crate::{
    ActivateError, ActivatedQueue, PauseError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Epoll token of the stop eventfd; queue notifiers use their index.
const TOKEN_STOP: u64 = NUM_QUEUES as u64;
/// Events fetched per wait: the queues and the stop eventfd.
const WORKER_EVENTS: usize = NUM_QUEUES + 1;

/// A virtio-balloon with free page reporting, for the MMIO transport.
pub struct BalloonDevice {
    acked_features: u64,
    config: ConfigSpace,
    worker: Option<Worker>,
    counters: Arc<Counters>,
    /// The budget for guest-triggered lines, for the device's whole life
    /// (shared with the transport and every worker).
    guest_log: GuestLog,
}

impl Default for BalloonDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl BalloonDevice {
    /// A balloon that asks for no pages; nothing runs until the driver
    /// activates it.
    pub fn new() -> Self {
        Self {
            acked_features: 0,
            config: ConfigSpace::default(),
            worker: None,
            counters: Arc::new(Counters::default()),
            guest_log: GuestLog::new(),
        }
    }

    /// What the device has released and refused so far.
    pub fn stats(&self) -> BalloonStats {
        self.counters.snapshot()
    }

    /// `actual` as the driver last wrote it.
    pub fn actual_pages(&self) -> u32 {
        self.config.actual
    }

    /// Whether the worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The queues the driver must set up for what it acked: inflate and
    /// deflate, plus reporting when negotiated.
    fn expected_queues(&self) -> usize {
        if self.acked_features & VIRTIO_BALLOON_F_REPORTING != 0 {
            NUM_QUEUES
        } else {
            NUM_QUEUES - 1
        }
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn available_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & (DEVICE_FEATURES | VIRTIO_F_VERSION_1);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Err(refused) = self.config.write(offset, data) {
            guest_warn!(self.guest_log, %refused, "virtio-balloon config write ignored");
        }
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let expected = self.expected_queues();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                ready: queues.len(),
            });
        }
        self.stop_worker();
        let handler = BalloonQueues::new(self.counters.clone(), self.guest_log.clone());
        let worker = spawn_worker(memory, interrupt, queues, handler)
            .map_err(|error| ActivateError::Backend(error.to_string()))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
        self.config = ConfigSpace::default();
    }

    /// Stops the worker; its queues' positions are where the last report
    /// it handled left them (every chain it pops is returned before it
    /// looks at the stop event, so nothing is in flight).
    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        let not_running = || PauseError::Backend {
            device_type: VIRTIO_ID_BALLOON,
            detail: "its worker had already stopped (a broken ring or a failed confinement)"
                .to_owned(),
        };
        let worker = self.worker.take().ok_or_else(not_running)?;
        worker.stop().ok_or_else(not_running)
    }

    fn guest_log(&self) -> GuestLog {
        self.guest_log.clone()
    }
}

impl Drop for BalloonDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// The thread that runs an activated device: it hands back where the
/// queues stand when stopped ([`DeviceWorker`]).
type Worker = DeviceWorker<Vec<QueueState>>;

struct WorkerState {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActivatedQueue>,
    handler: BalloonQueues,
    epoll: Epoll,
    guest_log: GuestLog,
}

/// Starts the worker running `handler` over the activated queues.
fn spawn_worker(
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActivatedQueue>,
    handler: BalloonQueues,
) -> Result<Worker, BalloonError> {
    let event_error = |what| move |source| BalloonError::Event { what, source };
    let stop = StopEvent::new().map_err(event_error("worker stop eventfd"))?;
    let epoll = queue_epoll(&queues, &stop, TOKEN_STOP).map_err(event_error(
        "worker epoll with the queue notifiers and the stop eventfd",
    ))?;
    let guest_log = handler.guest_log().clone();
    let mut state = WorkerState {
        memory,
        interrupt,
        queues,
        handler,
        epoll,
        guest_log,
    };
    let name = "balloon".to_owned();
    DeviceWorker::spawn(name.clone(), stop, move || {
        state.run().then(|| queue_states(&state.queues))
    })
    .map_err(|source| BalloonError::Thread { name, source })
}

impl WorkerState {
    /// Runs until the stop event (`true`) or a failure (`false`).
    fn run(&mut self) -> bool {
        let mut events = [EpollEvent::default(); WORKER_EVENTS];
        // The driver may have posted chains before DRIVER_OK reached us.
        let mut more = true;
        loop {
            // Chains left over: look for a stop or new kicks, but do not
            // sleep.
            let timeout = if more { 0 } else { -1 };
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::error!(%error, "virtio-balloon worker epoll_wait failed; device stops");
                    return false;
                }
            };
            if count == 0 && !more {
                continue;
            }
            for event in &events[..count] {
                match event.data() {
                    TOKEN_STOP => return true,
                    token => {
                        if let Some(queue) = self.queues.get(token as usize) {
                            // EAGAIN only means an earlier read took the count.
                            let _ = queue.notifier.read();
                        }
                    }
                }
            }
            let outcome = self.handler.pump(
                &self.memory,
                self.queues.iter_mut().map(|queue| &mut queue.queue),
            );
            match outcome {
                Ok(outcome) => {
                    more = outcome.more;
                    if outcome.notify {
                        if let Err(error) = self.interrupt.signal_used_queue() {
                            tracing::warn!(%error, "cannot interrupt the guest for virtio-balloon");
                        }
                    }
                }
                Err(error) => {
                    // A broken ring is the driver's doing, and a reset
                    // brings the device back to fail again: rate-limited.
                    guest_warn!(self.guest_log, %error, "virtio-balloon queue processing failed; device stops");
                    return false;
                }
            }
        }
    }
}
