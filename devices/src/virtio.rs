//! The interface between a virtio device and the virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`] against `vm-memory` and
//! `virtio-queue` only; it never learns which VMM maps it. The built-in VMM
//! reaches devices through [`MmioTransport`](crate::MmioTransport)
//! (virtio-mmio v2, ioeventfd notifications, irqfd interrupts), which hands
//! them their activated queues and a [`VirtioInterrupt`].

use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::guest_log::GuestLog;

/// Whether the driver's available index runs more than a whole ring ahead
/// of the device: no valid driver does that. `virtio-queue` then pops
/// nothing while `enable_notification` keeps saying more is there, so a
/// device loop that re-checks after enabling notifications (virtio 1.2,
/// 2.7.10) must stop on it, or a guest could spin a host thread forever.
/// The queue is left alone until the driver's next kick.
pub fn avail_ring_overrun<M: vm_memory::GuestMemory>(queue: &Queue, mem: &M) -> bool {
    use virtio_queue::QueueT;
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(avail) => avail.0.wrapping_sub(queue.next_avail()) > queue.size(),
        Err(_) => true,
    }
}

/// Ends a device's drain of `queue`: re-enables the driver's
/// notifications and says whether to drain again, because chains arrived
/// meanwhile (virtio 1.2, 2.7.10) and the available index is sane (see
/// [`avail_ring_overrun`]). Every device loop stops through this, so the
/// guard against a guest that runs its index ahead lives in one place.
pub fn rearm_and_recheck<M: vm_memory::GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::QueueT;
    Ok(queue.enable_notification(mem)? && !avail_ring_overrun(queue, mem))
}

/// Feature bit 32: the device follows virtio 1.x (required by MMIO v2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits written by the driver (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// How a device tells the driver something happened.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in a used ring.
    fn signal_used_queue(&self) -> std::io::Result<()>;
    /// The device's configuration space changed.
    fn signal_config_change(&self) -> std::io::Result<()>;
}

/// A queue the driver set up, with the eventfd that fires when the driver
/// notifies it.
pub struct ActivatedQueue {
    pub queue: Queue,
    pub notifier: EventFd,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled a different number of queues than the device needs.
    #[error("the driver set up {ready} queues, the device needs {expected}")]
    QueueCount { expected: usize, ready: usize },
    /// The device's own backend failed to start.
    #[error("device backend failed to start: {0}")]
    Backend(String),
}

/// Why a device could not be paused for a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The device model has no pause: its state lives where a snapshot
    /// cannot carry it (a backend process, open host connections).
    #[error("virtio device type {device_type} cannot be paused for a snapshot")]
    Unsupported { device_type: u32 },
    /// The device's worker did not stop cleanly.
    #[error("virtio device type {device_type} did not stop cleanly: {detail}")]
    Backend { device_type: u32, detail: String },
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block, 19 vsock, 26 fs, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The feature bits the device offers (the transport adds VERSION_1).
    fn available_features(&self) -> u64;
    /// The feature bits the driver accepted.
    fn set_acked_features(&mut self, features: u64);
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device once the driver set DRIVER_OK.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device after the driver wrote 0 to the status register.
    fn reset(&mut self);
    /// Stops an activated device's work so its queues stand still, for a
    /// snapshot, and returns where each queue it was activated with
    /// stands, in the order `activate` received them. The device keeps its
    /// acked features and configuration; `activate` with queues rebuilt
    /// from these states continues it (in this VM, or in one restored from
    /// the snapshot). The default refuses: a device must opt in.
    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        Err(PauseError::Unsupported {
            device_type: self.device_type(),
        })
    }
    /// The budget for log lines the guest can cause through this device;
    /// the transport logs on the same budget. A device that keeps one for
    /// its own lines returns a clone of it (the default is a fresh one).
    fn guest_log(&self) -> GuestLog {
        GuestLog::new()
    }
}
