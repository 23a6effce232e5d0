//! The virtio-fs model as a [`VirtioDevice`] for the built-in VMM.
//!
//! The transport (virtio-mmio) owns the registers; this adapter answers its
//! questions from the device model (type 26, features, configuration space,
//! one hiprio plus N request queues) and, on activation, starts one worker
//! thread per queue. A worker sleeps in epoll on two eventfds: the queue's
//! notifier (a KVM ioeventfd on QueueNotify) and a stop event. When kicked it
//! drains the queue through [`FsDeviceModel::process_queue`] and raises the
//! interrupt if the driver wants one. Reset and drop signal the stop event
//! and join every worker, so no thread or fd outlives the device.
//!
//! Each activation builds a fresh device model, so a guest that resets the
//! device (a reboot) starts with an empty inode table. The one exception is
//! the activation after `pause` (a snapshot of a running VM): the workers
//! stop and hand back their queues, and the same model, with the driver's
//! inodes and open files, serves again when the VM resumes. The device's
//! [`GuestLog`] is not renewed with it: a guest cannot buy a fresh log
//! budget by resetting the device.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::FsConfig;
use super::model::{FsDeviceModel, EVENT_IDX_FEATURE, FS_DEVICE_TYPE};
use super::FsError;
use crate::guest_log::{guest_event, guest_warn, GuestLog};
use crate::{ActivateError, ActivatedQueue, PauseError, VirtioDevice, VirtioInterrupt};

/// Epoll token of a worker's queue notifier.
const TOKEN_QUEUE: u64 = 0;
/// Epoll token of a worker's stop event.
const TOKEN_STOP: u64 = 1;
/// Events one `epoll_wait` can return: a worker watches two fds.
const WORKER_EPOLL_EVENTS: usize = 2;

/// A virtio-fs device for the built-in VMM's virtio-mmio transport.
pub struct VirtioFs {
    config: FsConfig,
    model: Arc<FsDeviceModel>,
    acked_features: u64,
    /// One per queue; each hands back its queue when stopped by `stop`.
    workers: Vec<JoinHandle<Option<QueueState>>>,
    stop: Option<EventFd>,
    /// Paused for a snapshot: the next activation keeps `model`.
    keep_model: bool,
    guest_log: GuestLog,
}

impl VirtioFs {
    /// Validates `config` and prepares the share; nothing runs until the
    /// driver activates the device.
    pub fn new(config: FsConfig) -> Result<Self, FsError> {
        let guest_log = GuestLog::new();
        let model = Arc::new(FsDeviceModel::with_guest_log(&config, guest_log.clone())?);
        Ok(Self {
            config,
            model,
            acked_features: 0,
            workers: Vec::new(),
            stop: None,
            keep_model: false,
            guest_log,
        })
    }

    /// The share this device serves.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// Number of running worker threads (one per activated queue).
    pub fn running_workers(&self) -> usize {
        self.workers.len()
    }

    fn start_workers(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), FsError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|source| FsError::EventSetup {
            what: "stop eventfd",
            source,
        })?;
        let event_idx = self.acked_features & EVENT_IDX_FEATURE != 0;
        let share = self.config.resolved_shared_dir()?;
        for (index, activated) in queues.into_iter().enumerate() {
            let mut worker = QueueWorker {
                index,
                model: self.model.clone(),
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                queue: activated.queue,
                notifier: activated.notifier,
                stop: stop.try_clone().map_err(|source| FsError::EventSetup {
                    what: "stop eventfd clone",
                    source,
                })?,
            };
            worker.queue.set_event_idx(event_idx);
            let name = format!("virtio-fs-q{index}");
            let share = share.clone();
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    // A worker that cannot confine itself must not serve
                    // the guest's requests.
                    if let Err(error) = husk_confine::confine_fs_thread(&share) {
                        tracing::error!(%error, "a virtio-fs queue worker does not run");
                        return None;
                    }
                    worker.run().then(|| worker.queue.state())
                })
                .map_err(|source| FsError::SpawnThread { name, source })?;
            self.workers.push(handle);
        }
        self.stop = Some(stop);
        Ok(())
    }

    /// Stops and joins every worker; returns each queue's position, in
    /// queue order, or `None` for a worker that had ended on its own.
    fn stop_workers(&mut self) -> Vec<Option<QueueState>> {
        if let Some(stop) = self.stop.take() {
            if let Err(error) = stop.write(1) {
                tracing::error!(%error, "virtio-fs: cannot signal the workers to stop");
            }
        }
        self.workers
            .drain(..)
            .map(|worker| match worker.join() {
                Ok(position) => position,
                Err(_) => {
                    tracing::error!("virtio-fs: a queue worker panicked");
                    None
                }
            })
            .collect()
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.model.queue_size(); self.model.num_queues()]
    }

    fn available_features(&self) -> u64 {
        self.model.features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.model.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The virtio-fs configuration space is read-only (virtio 1.2, 5.11.4).
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-fs: ignoring a configuration space write"
        );
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let expected = self.model.num_queues();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                ready: queues.len(),
            });
        }
        self.stop_workers();
        // A fresh model per activation: nothing the previous driver looked up
        // or opened survives a reset. After a pause the driver goes on with
        // the same session, and so does the model.
        if !std::mem::take(&mut self.keep_model) {
            self.model = Arc::new(
                FsDeviceModel::with_guest_log(&self.config, self.guest_log.clone())
                    .map_err(|error| ActivateError::Backend(error.to_string()))?,
            );
        }
        if let Err(error) = self.start_workers(memory, interrupt, queues) {
            self.stop_workers();
            return Err(ActivateError::Backend(error.to_string()));
        }
        // A guest can reset and re-activate at will: rate-limited too.
        guest_event!(self.guest_log, tracing::Level::INFO, tag = %self.config.tag, queues = expected, "virtio-fs activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.keep_model = false;
        self.acked_features = 0;
    }

    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        let positions = self.stop_workers();
        let all: Option<Vec<QueueState>> = positions.into_iter().collect();
        match all {
            Some(positions) if !positions.is_empty() => {
                self.keep_model = true;
                Ok(positions)
            }
            _ => Err(PauseError::Backend {
                device_type: FS_DEVICE_TYPE,
                detail: "it was not running, or a queue worker had already stopped".to_owned(),
            }),
        }
    }

    fn guest_log(&self) -> GuestLog {
        self.guest_log.clone()
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Everything one queue's thread owns.
struct QueueWorker {
    index: usize,
    model: Arc<FsDeviceModel>,
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
    notifier: EventFd,
    stop: EventFd,
}

impl QueueWorker {
    /// Serves the queue until the stop event (`true`) or a failure
    /// (`false`).
    fn run(&mut self) -> bool {
        let epoll = match self.epoll() {
            Ok(epoll) => epoll,
            Err(error) => {
                tracing::error!(%error, queue = self.index, "virtio-fs: cannot set up the queue worker");
                return false;
            }
        };
        // The driver may have queued requests before DRIVER_OK reached us.
        self.serve_queue();
        let mut events = [EpollEvent::default(); WORKER_EPOLL_EVENTS];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::error!(%error, queue = self.index, "virtio-fs: epoll_wait failed");
                    return false;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    TOKEN_STOP => return true,
                    TOKEN_QUEUE => {
                        // Non-blocking: a spurious wake-up reads EAGAIN.
                        let _ = self.notifier.read();
                        self.serve_queue();
                    }
                    other => tracing::debug!(token = other, "virtio-fs: unexpected epoll token"),
                }
            }
        }
    }

    fn epoll(&self) -> std::io::Result<Epoll> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.notifier.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_QUEUE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        Ok(epoll)
    }

    fn serve_queue(&mut self) {
        match self.model.process_queue(&self.memory, &mut self.queue) {
            Ok(true) => {
                if let Err(error) = self.interrupt.signal_used_queue() {
                    tracing::error!(%error, queue = self.index, "virtio-fs: cannot raise the interrupt");
                }
            }
            Ok(false) => {}
            // A ring the driver broke (an avail index past the ring, say):
            // every later kick fails again, so the line is rate-limited.
            Err(error) => {
                guest_warn!(self.model.guest_log(), %error, queue = self.index, "virtio-fs: queue is broken")
            }
        }
    }
}
