//! The [`VirtioDevice`] adapter: how the built-in VMM's virtio-mmio
//! transport sees the net model, and the worker thread that runs it.
//!
//! The device holds the TAP for its whole life. `activate` builds a fresh
//! [`NetModel`] over it (setting the TAP's offloads to what the driver
//! acked) and starts a [`Worker`]: one thread, confined as a device thread,
//! blocked in epoll on the two queue eventfds (KVM ioeventfds), the TAP fd
//! (edge-triggered, see [`super::model`]) and a stop eventfd. It runs the
//! model on each wake-up, raises the interrupt when the model used buffers,
//! and polls again without sleeping while the model says work is left.
//! `reset` and drop stop and join the worker; the counters and the log
//! budget outlive it, so a guest gains nothing by resetting the card.
//! `pause` (for a snapshot) stops the worker and returns where the queues
//! stand; the next `activate` builds a new model over the same TAP from
//! there (a frame the old model held for a full receive ring is dropped,
//! as a full ring would have dropped it).

use std::sync::Arc;

use virtio_queue::{QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::model::{self, Counters, NetModel, EVENT_IDX};
use super::tap::{FrameDevice, Tap};
use super::{
    NetConfig, NetError, NetStats, MMIO_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE_INDEX, TX_QUEUE_INDEX,
    VIRTIO_ID_NET,
};
use crate::guest_log::{guest_warn, GuestLog};
use crate::worker::{queue_epoll, queue_states, DeviceWorker, StopEvent};
use crate::{
    ActivateError, ActivatedQueue, PauseError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Epoll tokens of the worker.
const TOKEN_RX: u64 = RX_QUEUE_INDEX as u64;
const TOKEN_TX: u64 = TX_QUEUE_INDEX as u64;
const TOKEN_TAP: u64 = 2;
const TOKEN_STOP: u64 = 3;
/// Events fetched per wait; the worker watches four fds.
const WORKER_EVENTS: usize = 4;

/// A virtio-net device for the MMIO transport.
pub struct NetDevice {
    config: NetConfig,
    tap: Arc<dyn FrameDevice>,
    acked_features: u64,
    worker: Option<Worker>,
    counters: Arc<Counters>,
    /// The budget for guest-triggered lines, for the device's whole life
    /// (shared with the transport and every model it activates).
    guest_log: GuestLog,
}

impl NetDevice {
    /// A card with `config`'s identity over `tap`; nothing runs until the
    /// driver activates it.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self, NetError> {
        Self::with_frame_device(Arc::new(tap), config)
    }

    /// Like [`Self::new`] over any frame device (the tests' fake TAP).
    pub(crate) fn with_frame_device(
        tap: Arc<dyn FrameDevice>,
        config: NetConfig,
    ) -> Result<Self, NetError> {
        config.validate()?;
        Ok(Self {
            config,
            tap,
            acked_features: 0,
            worker: None,
            counters: Arc::new(Counters::default()),
            guest_log: GuestLog::new(),
        })
    }

    /// The card's configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Whether the worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// What the card has moved and refused so far.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    fn start(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActivatedQueue>,
    ) -> Result<(), NetError> {
        let mut model = NetModel::new(
            self.tap.clone(),
            self.counters.clone(),
            self.guest_log.clone(),
        );
        model.set_acked_features(self.acked_features);
        let event_idx = self.acked_features & EVENT_IDX != 0;
        for queue in &mut queues {
            queue.queue.set_event_idx(event_idx);
        }
        self.worker = Some(spawn_worker(memory, interrupt, queues, model)?);
        Ok(())
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![MMIO_QUEUE_SIZE; NUM_QUEUES]
    }

    fn available_features(&self) -> u64 {
        model::device_features(self.tap.supported_offloads())
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & (self.available_features() | VIRTIO_F_VERSION_1);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        model::read_config(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // mac is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's legacy
        // path, which is not offered: the space is read-only (virtio 1.2,
        // 5.1.4.1).
        guest_warn!(
            self.guest_log,
            offset,
            len = data.len(),
            "driver wrote the read-only virtio-net config space"
        );
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                ready: queues.len(),
            });
        }
        self.stop_worker();
        self.start(memory, interrupt, queues)
            .map_err(|error| ActivateError::Backend(error.to_string()))
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }

    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        self.worker
            .take()
            .and_then(Worker::stop)
            .ok_or_else(|| PauseError::Backend {
                device_type: VIRTIO_ID_NET,
                detail: "its worker had already stopped (a broken ring or a failed confinement)"
                    .to_owned(),
            })
    }

    fn guest_log(&self) -> GuestLog {
        self.guest_log.clone()
    }
}

impl Drop for NetDevice {
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
    model: NetModel,
    epoll: Epoll,
}

/// Starts the worker running `model` over the activated queues (rx, tx).
fn spawn_worker(
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActivatedQueue>,
    model: NetModel,
) -> Result<Worker, NetError> {
    let tap_name = model.tap_name().to_owned();
    let event_error = |what| {
        let name = tap_name.clone();
        move |source| NetError::Event { name, what, source }
    };
    let stop = StopEvent::new().map_err(event_error("worker stop eventfd"))?;
    let epoll = queue_epoll(&queues, &stop, TOKEN_STOP).map_err(event_error(
        "worker epoll with the queue notifiers and the stop eventfd",
    ))?;
    epoll
        .ctl(
            ControlOperation::Add,
            model.tap_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
        )
        .map_err(event_error("register the TAP fd"))?;
    let name = format!("net-{tap_name}");
    let mut state = WorkerState {
        memory,
        interrupt,
        queues,
        model,
        epoll,
    };
    DeviceWorker::spawn(name.clone(), stop, move || {
        state.run().then(|| queue_states(&state.queues))
    })
    .map_err(|source| NetError::Thread { name, source })
}

impl WorkerState {
    /// Runs until the stop event (`true`) or a failure (`false`).
    fn run(&mut self) -> bool {
        let mut events = [EpollEvent::default(); WORKER_EVENTS];
        // The driver may have posted buffers, and the TAP queued frames,
        // before DRIVER_OK reached us.
        let mut more = true;
        loop {
            // Work left over: look for a stop or new kicks, but do not sleep.
            let timeout = if more { 0 } else { -1 };
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::error!(%error, "virtio-net worker epoll_wait failed; device stops");
                    return false;
                }
            };
            if count == 0 && !more {
                continue;
            }
            // Transmit is looked at on every pump; receive when kicked.
            let mut rx_event = more;
            for event in &events[..count] {
                match event.data() {
                    TOKEN_STOP => return true,
                    TOKEN_RX => {
                        self.drain_notifier(RX_QUEUE_INDEX);
                        rx_event = true;
                    }
                    TOKEN_TX => self.drain_notifier(TX_QUEUE_INDEX),
                    TOKEN_TAP => rx_event = true,
                    _ => {}
                }
            }
            match self.pump(rx_event) {
                Ok(left) => more = left,
                Err(error) => {
                    // A broken ring is the driver's doing, and a reset brings
                    // the device back to fail again: rate-limited.
                    guest_warn!(self.model.guest_log(), %error, "virtio-net queue processing failed; device stops");
                    return false;
                }
            }
        }
    }

    fn drain_notifier(&self, index: usize) {
        if let Some(queue) = self.queues.get(index) {
            // EAGAIN only means a previous read already consumed the count.
            let _ = queue.notifier.read();
        }
    }

    /// Runs the model and interrupts the guest if it used buffers; returns
    /// whether work is left.
    fn pump(&mut self, rx_event: bool) -> Result<bool, NetError> {
        let [rx_queue, tx_queue, ..] = self.queues.as_mut_slice() else {
            return Ok(false);
        };
        let outcome = self.model.pump(
            &self.memory,
            &mut rx_queue.queue,
            &mut tx_queue.queue,
            rx_event,
        )?;
        if outcome.rx_used || outcome.tx_used {
            if let Err(error) = self.interrupt.signal_used_queue() {
                tracing::warn!(%error, "cannot interrupt the guest for virtio-net");
            }
        }
        Ok(outcome.more)
    }
}
