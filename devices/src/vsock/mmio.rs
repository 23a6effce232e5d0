//! The [`VirtioDevice`] adapter: how the built-in VMM's virtio-mmio
//! transport sees the vsock model.
//!
//! The device binds its host listening socket when it is created, so host
//! clients can connect (and wait in the backlog) before the guest driver is
//! up. `activate` hands a clone of that socket to a new [`VsockModel`] and
//! starts an [`MmioWorker`] to run it; `reset` stops the
//! worker, which closes every connection, while the listening socket stays.
//! `pause` (for a snapshot) stops the worker but keeps the model, so the
//! next `activate` goes on with the same connections. Dropping the device
//! removes the socket file.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use virtio_queue::QueueState;
use vm_memory::GuestMemoryMmap;

use super::event_loop::{spawn_worker, MmioWorker};
use super::model::{self, VsockModel, DEVICE_FEATURES};
use super::muxer::bind_listener;
use super::{
    VsockConfig, VsockError, VsockTimeouts, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_VSOCK,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_log::{guest_warn, GuestLog};
use crate::{
    ActivateError, ActivatedQueue, PauseError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// A virtio-vsock device for the MMIO transport.
pub struct VsockDevice {
    config: VsockConfig,
    timeouts: VsockTimeouts,
    listener: UnixListener,
    acked_features: u64,
    worker: Option<MmioWorker>,
    /// The model of a paused worker, with its connections.
    paused_model: Option<VsockModel>,
    /// The budget for guest-triggered lines, for the device's whole life
    /// (shared with the transport and every model it activates).
    guest_log: GuestLog,
}

impl VsockDevice {
    /// Creates the device and starts listening on `config.uds_path` (which
    /// must not exist).
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        Self::with_timeouts(config, VsockTimeouts::default())
    }

    /// Like [`Self::new`] with non-default timeouts.
    pub fn with_timeouts(config: VsockConfig, timeouts: VsockTimeouts) -> Result<Self, VsockError> {
        config.validate()?;
        let listener = bind_listener(&config.uds_path)?;
        Ok(Self {
            config,
            timeouts,
            listener,
            acked_features: 0,
            worker: None,
            paused_model: None,
            guest_log: GuestLog::new(),
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Whether the device's worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn start(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActivatedQueue>,
    ) -> Result<(), VsockError> {
        // After a pause, the same model goes on with its connections.
        let model = match self.paused_model.take() {
            Some(model) => model,
            None => VsockModel::new(
                &self.config,
                self.timeouts,
                &self.listener,
                self.guest_log.clone(),
            )?,
        };
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut queues {
            virtio_queue::QueueT::set_event_idx(&mut queue.queue, event_idx);
        }
        self.worker = Some(spawn_worker(
            memory,
            interrupt,
            queues,
            model,
            self.config.guest_cid,
        )?);
        Ok(())
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn available_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & (self.available_features() | VIRTIO_F_VERSION_1);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        model::read_config(self.config.guest_cid, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The config space is read-only for the driver (virtio 1.2, 5.10.4).
        guest_warn!(
            self.guest_log,
            offset,
            len = data.len(),
            "driver wrote the read-only vsock config space"
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
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.start(memory, interrupt, queues)
            .map_err(|error| ActivateError::Backend(error.to_string()))
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.paused_model = None;
        self.acked_features = 0;
    }

    /// Stops the worker but keeps its model, so the listener and every
    /// connection survive a pause; the next `activate` continues them.
    /// A device restored from a snapshot starts with none.
    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        let not_running = || PauseError::Backend {
            device_type: VIRTIO_ID_VSOCK,
            detail: "its worker had already stopped (a broken ring or a failed confinement)"
                .to_owned(),
        };
        let paused = self
            .worker
            .take()
            .and_then(MmioWorker::stop)
            .ok_or_else(not_running)?;
        self.paused_model = Some(paused.model);
        Ok(paused.queues)
    }

    fn guest_log(&self) -> GuestLog {
        self.guest_log.clone()
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        if let Err(error) = std::fs::remove_file(&self.config.uds_path) {
            tracing::debug!(%error, path = %self.config.uds_path.display(), "cannot remove the vsock socket");
        }
    }
}
