//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! One `MmioTransport` owns one device model and a 4 KiB register window on
//! the MMIO bus. Queue notifications normally bypass it: the VMM registers
//! each queue's eventfd as a KVM ioeventfd on `QueueNotify` with the queue
//! index as datamatch, so a notify never leaves the kernel. Interrupts go out
//! through an irqfd after the interrupt-status bits are set.
//!
//! Everything the driver writes here is guest input: the warnings it can
//! cause (a broken queue, a failed activation, repeated at will by resetting
//! the device) go through the device's [`GuestLog`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest_log::{guest_error, guest_warn, GuestLog};
use crate::virtio::{
    status, ActivateError, ActivatedQueue, PauseError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// "HUSK" in little endian: our vendor id.
pub const MMIO_VENDOR_ID: u32 = 0x4b53_5548;
/// Offset of the queue-notify register, where ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset where the device-specific configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Interrupt-status bit: a used ring was updated.
const INTERRUPT_USED_RING: u32 = 1;
/// Interrupt-status bit: the configuration space changed.
const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Raises the device's interrupt: status bits plus an irqfd.
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.raise(INTERRUPT_USED_RING)
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(INTERRUPT_CONFIG_CHANGE)
    }
}

/// A device model behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_notifiers: Vec<EventFd>,
    interrupt_status: Arc<AtomicU32>,
    irqfd: EventFd,
    device_status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    activated: bool,
    /// Activated, and its worker stopped for a snapshot.
    paused: bool,
    /// The device's budget for guest-triggered lines, shared with it.
    guest_log: GuestLog,
}

/// Errors from building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for the virtio-mmio transport: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device declared a queue size virtio-queue rejects.
    #[error("device type {device_type} declares an invalid maximum queue size {size}")]
    QueueSize { device_type: u32, size: u16 },
    /// A saved transport state does not fit the device, or the device did
    /// not start again from it.
    #[error("cannot restore virtio device type {device_type}: {detail}")]
    Restore { device_type: u32, detail: String },
}

/// Why a device was not activated.
#[derive(Debug, thiserror::Error)]
enum ActivationFailure {
    #[error("the driver set up an invalid queue")]
    InvalidQueue,
    #[error("cannot copy a queue for the device: {0}")]
    QueueCopy(String),
    #[error("cannot clone an eventfd for the device: {0}")]
    Clone(std::io::Error),
    #[error("the device failed to activate: {0}")]
    Device(ActivateError),
}

/// One queue's registers and ring positions in a [`TransportState`]
/// (`virtio_queue::QueueState`, which has no serde form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl SavedQueue {
    fn of(queue: &Queue) -> Self {
        let state = queue.state();
        Self {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx_enabled: state.event_idx_enabled,
        }
    }

    fn to_queue_state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
        }
    }
}

/// What a snapshot keeps of one virtio-mmio transport: the registers the
/// driver wrote and each queue's layout and position. The device model's
/// own state is not in it: a device that can be snapshotted keeps nothing
/// the driver depends on beyond its acked features, which are here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<SavedQueue>,
}

impl MmioTransport {
    /// Wraps `device`; interrupts go through `irqfd`, which the caller
    /// registers with KVM for the device's GSI.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        let guest_log = device.guest_log();
        let mut queues = Vec::new();
        let mut queue_notifiers = Vec::new();
        for size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueSize { device_type, size })?);
            queue_notifiers.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            memory,
            queues,
            queue_notifiers,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irqfd,
            device_status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            activated: false,
            paused: false,
            guest_log,
        })
    }

    /// The per-queue eventfds, in queue order, for ioeventfd registration.
    pub fn queue_notifiers(&self) -> &[EventFd] {
        &self.queue_notifiers
    }

    /// The virtio device id of the wrapped model.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The current device status register (tests and diagnostics).
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// The device's guest-log budget and its totals.
    pub fn guest_log(&self) -> &GuestLog {
        &self.guest_log
    }

    fn offered_features(&self) -> u64 {
        self.device.available_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn register_read(&self, offset: u64) -> u32 {
        let selected = self.queues.get(self.queue_select as usize);
        match offset {
            0x000 => MMIO_MAGIC_VALUE,
            0x004 => MMIO_VERSION,
            0x008 => self.device.device_type(),
            0x00c => MMIO_VENDOR_ID,
            0x010 => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => selected.map_or(0, |q| u32::from(q.max_size())),
            0x044 => selected.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status.load(Ordering::SeqCst),
            0x070 => self.device_status,
            // No shared-memory regions: a length of all ones means "absent".
            0x0b0 | 0x0b4 => u32::MAX,
            0x0fc => 0, // configuration generation: config never changes under the driver
            _ => {
                tracing::debug!(offset, "virtio-mmio read of an unknown register");
                0
            }
        }
    }

    fn register_write(&mut self, offset: u64, value: u32) {
        let ready_before_setup = self.device_status & status::DRIVER_OK != 0;
        match offset {
            0x014 => self.device_features_select = value,
            0x020 => {
                if ready_before_setup {
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_size(value as u16);
                }
            }
            0x044 => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            0x050 => {
                // Reached only when the ioeventfd did not match (or none is
                // registered, as in unit tests): forward the notification.
                if let Some(notifier) = self.queue_notifiers.get(value as usize) {
                    if let Err(error) = notifier.write(1) {
                        guest_warn!(self.guest_log, %error, queue = value, "cannot forward a queue notification");
                    }
                }
            }
            0x064 => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            0x070 => self.write_status(value),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => tracing::debug!(offset, value, "virtio-mmio write to an unknown register"),
        }
    }

    fn with_queue(&mut self, update: impl FnOnce(&mut Queue)) {
        // Queue layout may only change before the driver is done.
        if self.device_status & status::DRIVER_OK == 0 {
            if let Some(queue) = self.selected_queue() {
                update(queue);
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly_set = value & !self.device_status;
        if newly_set & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver accepted features we never offered, or refused
                // VERSION_1 (legacy is not supported): leave FEATURES_OK
                // clear so the driver sees the negotiation failed.
                self.device_status = value & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        self.device_status = value;
        if newly_set & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    /// Activates the device when the driver sets DRIVER_OK; a failure is
    /// the driver's to see (DEVICE_NEEDS_RESET) and is logged on the
    /// guest's budget.
    fn activate(&mut self) {
        if let Err(failure) = self.try_activate() {
            match failure {
                ActivationFailure::InvalidQueue | ActivationFailure::QueueCopy(_) => {
                    guest_warn!(self.guest_log, device_type = self.device.device_type(), %failure, "virtio device not activated")
                }
                _ => {
                    guest_error!(self.guest_log, device_type = self.device.device_type(), %failure, "virtio device not activated")
                }
            }
            self.device_status |= status::DEVICE_NEEDS_RESET;
        }
    }

    /// Hands the device its ready queues (copies: the transport keeps the
    /// registers so the driver still reads what it wrote) and an interrupt.
    fn try_activate(&mut self) -> Result<(), ActivationFailure> {
        let mut activated_queues = Vec::new();
        for (queue, notifier) in self.queues.iter().zip(&self.queue_notifiers) {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.memory) {
                return Err(ActivationFailure::InvalidQueue);
            }
            let notifier = notifier.try_clone().map_err(ActivationFailure::Clone)?;
            let queue = Queue::try_from(queue.state())
                .map_err(|error| ActivationFailure::QueueCopy(format!("{error:?}")))?;
            activated_queues.push(ActivatedQueue { queue, notifier });
        }
        let irqfd = self.irqfd.try_clone().map_err(ActivationFailure::Clone)?;
        let interrupt = Arc::new(MmioInterrupt {
            status: self.interrupt_status.clone(),
            irqfd,
        });
        self.device
            .activate(self.memory.clone(), interrupt, activated_queues)
            .map_err(ActivationFailure::Device)?;
        self.activated = true;
        Ok(())
    }

    /// Pauses an activated device for a snapshot: its worker stops and the
    /// transport's queue registers take the positions the device reached,
    /// so [`MmioTransport::save_state`] records where the rings stand. A
    /// device that was never activated has nothing to stop.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        if !self.activated || self.paused {
            self.paused = self.activated;
            return Ok(());
        }
        let positions = self.device.pause()?;
        let ready = self.queues.iter().filter(|q| q.ready()).count();
        if positions.len() != ready {
            // The device has stopped: `resume` starts it again from the
            // transport's own positions.
            self.paused = true;
            return Err(PauseError::Backend {
                device_type: self.device.device_type(),
                detail: format!(
                    "it returned {} queue states for {ready} ready queues",
                    positions.len()
                ),
            });
        }
        for (queue, position) in self.queues.iter_mut().filter(|q| q.ready()).zip(positions) {
            queue.set_next_avail(position.next_avail);
            queue.set_next_used(position.next_used);
            queue.set_event_idx(position.event_idx_enabled);
        }
        self.paused = true;
        Ok(())
    }

    /// Starts a paused device again from where its queues stand.
    pub fn resume(&mut self) -> Result<(), MmioError> {
        if !self.paused {
            return Ok(());
        }
        self.paused = false;
        self.activated = false;
        self.try_activate().map_err(|failure| MmioError::Restore {
            device_type: self.device.device_type(),
            detail: failure.to_string(),
        })
    }

    /// Raises the device's interrupt again if its status says one is
    /// pending (a restored VM's controllers may not hold it).
    pub fn reassert_interrupt(&self) {
        if self.interrupt_status.load(Ordering::SeqCst) != 0 {
            if let Err(error) = self.irqfd.write(1) {
                tracing::warn!(%error, device_type = self.device.device_type(), "cannot raise a restored device's pending interrupt");
            }
        }
    }

    /// The transport's registers and queue positions, for a snapshot.
    /// An activated device must be paused first, or its queue positions
    /// would be the ones it was activated with.
    pub fn save_state(&self) -> Result<TransportState, PauseError> {
        if self.activated && !self.paused {
            return Err(PauseError::Backend {
                device_type: self.device.device_type(),
                detail: "the device is running: pause it before saving its state".to_owned(),
            });
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_status: self.device_status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            activated: self.activated,
            queues: self.queues.iter().map(SavedQueue::of).collect(),
        })
    }

    /// A transport for `device` in the state a snapshot recorded: the
    /// registers the driver wrote, the features it acked, and, when the
    /// device was running, the device activated again with its queues
    /// where they stood. `device` must be the same kind of device with the
    /// same queues; a mismatch is refused naming both.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        irqfd: EventFd,
        state: &TransportState,
    ) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        let mismatch = |detail: String| MmioError::Restore {
            device_type,
            detail,
        };
        if device_type != state.device_type {
            return Err(mismatch(format!(
                "the snapshot holds a device of type {} in this window",
                state.device_type
            )));
        }
        let max_sizes = device.queue_max_sizes();
        let saved_max: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if max_sizes != saved_max {
            return Err(mismatch(format!(
                "the device has queues of {max_sizes:?} entries, the snapshot {saved_max:?}"
            )));
        }
        let mut transport = Self::new(device, memory, irqfd)?;
        for (queue, saved) in transport.queues.iter_mut().zip(&state.queues) {
            *queue = Queue::try_from(saved.to_queue_state())
                .map_err(|error| mismatch(format!("a saved queue is invalid: {error:?}")))?;
        }
        transport.device_status = state.device_status;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.driver_features = state.driver_features;
        transport.queue_select = state.queue_select;
        transport
            .interrupt_status
            .store(state.interrupt_status, Ordering::SeqCst);
        if state.device_status & status::FEATURES_OK != 0 {
            transport.device.set_acked_features(state.driver_features);
        }
        if state.activated {
            transport
                .try_activate()
                .map_err(|failure| mismatch(failure.to_string()))?;
        }
        Ok(transport)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.paused = false;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device_status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        // Registers are 32 bits wide and must be read whole.
        match data.len() {
            4 => data.copy_from_slice(&self.register_read(offset).to_le_bytes()),
            _ => {
                tracing::debug!(
                    offset,
                    len = data.len(),
                    "virtio-mmio register read of the wrong width"
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) => self.register_write(offset, u32::from_le_bytes(bytes)),
            Err(_) => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register write of the wrong width"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// What the fake device saw, shared with the test.
    #[derive(Default)]
    struct Observed {
        acked_features: u64,
        activated_queues: usize,
        resets: usize,
    }

    struct FakeDevice(Arc<Mutex<Observed>>, GuestLog);

    /// A clock that never moves: every guest-log line falls in one window.
    struct FrozenClock(std::time::Instant);

    impl crate::guest_log::Clock for FrozenClock {
        fn now(&self) -> std::time::Instant {
            self.0
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 256, 64]
        }
        fn available_features(&self) -> u64 {
            1 << 3
        }
        fn set_acked_features(&mut self, features: u64) {
            self.0.lock().unwrap().acked_features = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x40);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _m: GuestMemoryMmap,
            _i: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActivatedQueue>,
        ) -> Result<(), crate::ActivateError> {
            self.0.lock().unwrap().activated_queues = queues.len();
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn guest_log(&self) -> GuestLog {
            self.1.clone()
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Observed>>, EventFd) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let observed = Arc::new(Mutex::new(Observed::default()));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let guest_log = GuestLog::with_clock(
            crate::guest_log::GUEST_LOG_BURST,
            crate::guest_log::GUEST_LOG_INTERVAL,
            Box::new(FrozenClock(std::time::Instant::now())),
        );
        let transport = MmioTransport::new(
            Box::new(FakeDevice(observed.clone(), guest_log)),
            memory,
            irqfd.try_clone().unwrap(),
        )
        .unwrap();
        (transport, observed, irqfd)
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn set_up_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write32(t, 0x030, index);
        write32(t, 0x038, 16);
        write32(t, 0x080, base as u32);
        write32(t, 0x090, (base + 0x1000) as u32);
        write32(t, 0x0a0, (base + 0x2000) as u32);
        write32(t, 0x044, 1);
    }

    #[test]
    fn a_restored_transport_reads_back_activates_and_raises_its_pending_interrupt() {
        let (mut t, _, _) = transport();
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for index in 0..3 {
            set_up_queue(&mut t, index, 0x1_0000 * u64::from(index + 1));
        }
        let mut state = t.save_state().unwrap();
        // As a running device's state would read after its pause.
        state.device_status |= status::DRIVER_OK;
        state.activated = true;
        state.interrupt_status = 1;
        state.queues[0].next_avail = 5;
        state.queues[0].next_used = 5;

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let observed = Arc::new(Mutex::new(Observed::default()));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut restored = MmioTransport::restore(
            Box::new(FakeDevice(observed.clone(), GuestLog::new())),
            memory.clone(),
            irqfd.try_clone().unwrap(),
            &state,
        )
        .unwrap();
        assert_eq!(read32(&mut restored, 0x070), state.device_status);
        assert_eq!(read32(&mut restored, 0x060), 1, "InterruptStatus");
        assert_eq!(observed.lock().unwrap().activated_queues, 3);
        assert_eq!(observed.lock().unwrap().acked_features, VIRTIO_F_VERSION_1);
        assert!(irqfd.read().is_err(), "nothing raised before it is asked");
        restored.reassert_interrupt();
        assert_eq!(
            irqfd.read().unwrap(),
            1,
            "the pending interrupt is raised again"
        );
        let again = {
            restored.pause().unwrap_err();
            // The fake cannot pause, so its state cannot be saved while it runs.
            restored.save_state().unwrap_err().to_string()
        };
        assert!(again.contains("pause it before saving"), "{again}");

        let mut other = state.clone();
        other.queues[2].max_size = 128;
        let error = MmioTransport::restore(
            Box::new(FakeDevice(observed, GuestLog::new())),
            memory,
            irqfd,
            &other,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            error.contains("[256, 256, 64]") && error.contains("[256, 256, 128]"),
            "{error}"
        );
    }

    #[test]
    fn identification_registers_read_magic_version_and_device_id() {
        let (mut t, _, _) = transport();
        assert_eq!(read32(&mut t, 0x000), MMIO_MAGIC_VALUE);
        assert_eq!(read32(&mut t, 0x004), 2);
        assert_eq!(read32(&mut t, 0x008), 19);
        assert_eq!(read32(&mut t, 0x00c), MMIO_VENDOR_ID);
        write32(&mut t, 0x030, 2);
        assert_eq!(read32(&mut t, 0x034), 64);
        write32(&mut t, 0x030, 7);
        assert_eq!(
            read32(&mut t, 0x034),
            0,
            "a queue the device lacks has size 0"
        );
    }

    #[test]
    fn handshake_acks_features_and_activates_ready_queues() {
        let (mut t, observed, _) = transport();
        write32(&mut t, 0x014, 1);
        assert_eq!(read32(&mut t, 0x010), 1, "VERSION_1 is offered in page 1");
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, 0x024, 0);
        write32(&mut t, 0x020, 1 << 3);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(read32(&mut t, 0x070) & status::FEATURES_OK, 0);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        write32(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let seen = observed.lock().unwrap();
        assert_eq!(seen.acked_features, VIRTIO_F_VERSION_1 | 1 << 3);
        assert_eq!(seen.activated_queues, 2);
    }

    #[test]
    fn features_never_offered_fail_negotiation() {
        let (mut t, observed, _) = transport();
        write32(&mut t, 0x024, 0);
        write32(&mut t, 0x020, 1 << 5);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read32(&mut t, 0x070) & status::FEATURES_OK, 0);
        assert_eq!(observed.lock().unwrap().acked_features, 0);
    }

    #[test]
    fn interrupts_set_status_fire_the_irqfd_and_are_acknowledged() {
        let (mut t, _, irqfd) = transport();
        let interrupt = MmioInterrupt {
            status: t.interrupt_status.clone(),
            irqfd: t.irqfd.try_clone().unwrap(),
        };
        interrupt.signal_used_queue().unwrap();
        assert_eq!(irqfd.read().unwrap(), 1);
        assert_eq!(read32(&mut t, 0x060), INTERRUPT_USED_RING);
        write32(&mut t, 0x064, INTERRUPT_USED_RING);
        assert_eq!(read32(&mut t, 0x060), 0);
    }

    #[test]
    fn queue_notify_without_ioeventfd_reaches_the_queue_notifier() {
        let (mut t, _, _) = transport();
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(t.queue_notifiers()[1].read().unwrap(), 1);
        assert!(t.queue_notifiers()[0].read().is_err());
    }

    #[test]
    fn status_zero_resets_an_active_device() {
        let (mut t, observed, _) = transport();
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        set_up_queue(&mut t, 0, 0x1_0000);
        write32(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        write32(&mut t, 0x070, 0);
        assert_eq!(observed.lock().unwrap().resets, 1);
        assert_eq!(read32(&mut t, 0x070), 0);
        write32(&mut t, 0x030, 0);
        assert_eq!(read32(&mut t, 0x044), 0, "queues are not ready after reset");
    }

    #[test]
    fn a_driver_activating_a_broken_queue_over_and_over_is_logged_within_the_budget() {
        let (mut t, observed, _) = transport();
        for _ in 0..50 {
            write32(&mut t, 0x024, 1);
            write32(&mut t, 0x020, 1);
            write32(
                &mut t,
                0x070,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
            // Rings far outside the 1 MiB of guest memory.
            set_up_queue(&mut t, 0, 0x4000_0000);
            write32(
                &mut t,
                0x070,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            );
            assert_ne!(read32(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
            write32(&mut t, 0x070, 0);
        }
        assert_eq!(observed.lock().unwrap().activated_queues, 0);
        let log = t.guest_log();
        assert_eq!(
            log.written_total(),
            u64::from(crate::guest_log::GUEST_LOG_BURST)
        );
        assert_eq!(
            log.suppressed_total(),
            50 - u64::from(crate::guest_log::GUEST_LOG_BURST)
        );
    }

    #[test]
    fn config_space_reads_go_to_the_device() {
        let (mut t, _, _) = transport();
        let mut data = [0u8; 2];
        t.read(CONFIG_SPACE_OFFSET + 2, &mut data);
        assert_eq!(data, [0x42, 0x42]);
    }
}
