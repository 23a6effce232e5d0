//! `mmio_registers`: a guest driver's register accesses to a virtio-mmio
//! transport (`husk_devices::MmioTransport`, the built-in VMM's bus
//! device), with the guest memory its queues point into.
//!
//! The first byte picks the device behind the transport: a ring walker
//! (a test device that, once activated, consumes every chain of every
//! queue it gets, as a device model would, on this thread), the vsock
//! device or the virtio-fs device (whose activation starts their worker
//! threads). Then each operation is a 32-bit register write or read (at a
//! known register or any offset, configuration space included), an access
//! of the wrong width, a write of guest memory (descriptor tables and
//! rings included), or a whole queue set up the way Linux does it.
//!
//! Oracle: no panic; the identification registers never change; the
//! driver never sees FEATURES_OK unless what it acked (as its own writes
//! add up) is a subset of what was offered and includes VERSION_1; a
//! status write of 0 reads back 0; the device is only given valid queues
//! and the features the driver acked; no file descriptor outlives the
//! transport.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use husk_devices::fs::{FsConfig, VirtioFs};
use husk_devices::vsock::{VsockConfig, VsockDevice};
use husk_devices::{
    status, ActivateError, ActivatedQueue, BusDevice, MmioTransport, VirtioDevice, VirtioInterrupt,
    MMIO_MAGIC_VALUE, MMIO_VENDOR_ID, VIRTIO_F_VERSION_1,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;
use crate::vsock_guest::open_fds;

const MEM_SIZE: usize = 1 << 20;
const MAX_OPS: usize = 256;
/// The registers of virtio-mmio v2 (virtio 1.2, 4.2.2).
const REGISTERS: [u64; 31] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0b4, 0x0b8,
    0x0bc, 0x0c0, 0x0fc, 0x100, 0x104,
];
const STATUS: u64 = 0x070;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;

/// A device model in miniature: on activation it walks and consumes every
/// available chain of every queue, reading each descriptor's buffer.
struct RingWalker {
    features: u64,
    offered: u64,
}

impl VirtioDevice for RingWalker {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 256, 1]
    }
    fn available_features(&self) -> u64 {
        self.offered
    }
    fn set_acked_features(&mut self, features: u64) {
        assert_eq!(
            features & !(self.offered | VIRTIO_F_VERSION_1),
            0,
            "the transport acked features never offered: {features:#x}"
        );
        self.features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        for mut activated in queues {
            let queue = &mut activated.queue;
            assert!(
                queue.is_valid(&memory),
                "the transport activated an invalid queue"
            );
            let mut buffer = [0u8; 256];
            // A broken ring stops the walk, as it stops a device.
            for _ in 0..64 {
                let Ok(mut iter) = queue.iter(&memory) else {
                    break;
                };
                let Some(chain) = iter.next() else {
                    break;
                };
                let head = chain.head_index();
                let mut len = 0u32;
                for desc in chain {
                    let n = (desc.len() as usize).min(buffer.len());
                    let _ = memory.read_slice(&mut buffer[..n], desc.addr());
                    len = len.wrapping_add(desc.len());
                }
                if queue.add_used(&memory, head, len.min(4096)).is_err() {
                    break;
                }
            }
        }
        let _ = interrupt.signal_used_queue();
        Ok(())
    }
    fn reset(&mut self) {
        self.features = 0;
    }
}

fn scratch_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| crate::process_dir("fuzz-mmio")).clone()
}

fn device(kind: u8, offered: u64) -> Box<dyn VirtioDevice> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    match kind % 8 {
        6 => {
            let uds_path =
                scratch_dir().join(format!("v{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
            Box::new(
                VsockDevice::new(VsockConfig::new(3, uds_path))
                    .expect("cannot create the vsock device"),
            )
        }
        7 => {
            let share = scratch_dir().join("share");
            std::fs::create_dir_all(&share).expect("mkdir share");
            let mut config = FsConfig::new(share);
            config.queue_size = 64;
            Box::new(VirtioFs::new(config).expect("cannot create the virtio-fs device"))
        }
        _ => Box::new(RingWalker {
            features: 0,
            offered,
        }),
    }
}

/// The driver's view of feature negotiation, from its own writes.
#[derive(Default)]
struct DriverModel {
    status: u32,
    driver_features: u64,
    driver_features_sel: u32,
    device_features_sel: u32,
}

struct Bus {
    transport: MmioTransport,
    mem: GuestMemoryMmap,
    model: DriverModel,
    offered: Option<u64>,
}

impl Bus {
    fn read32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        let value = u32::from_le_bytes(data);
        match offset {
            0x000 => assert_eq!(value, MMIO_MAGIC_VALUE),
            0x004 => assert_eq!(value, 2, "virtio-mmio version"),
            0x00c => assert_eq!(value, MMIO_VENDOR_ID),
            0x010 => {
                let shift = match self.model.device_features_sel {
                    0 => Some(0),
                    1 => Some(32),
                    _ => None,
                };
                match shift {
                    Some(shift) => {
                        let page = u64::from(value) << shift;
                        let offered = self.offered.get_or_insert(0);
                        *offered |= page;
                        if shift == 32 {
                            assert_ne!(value & 1, 0, "VERSION_1 must be offered");
                        }
                    }
                    None => assert_eq!(value, 0, "a feature page past the second"),
                }
            }
            _ => {}
        }
        value
    }

    /// FEATURES_OK only sticks for a subset of the offered features that
    /// includes VERSION_1.
    fn check_negotiation(&self) {
        let offered = self.transport_offered();
        let acked = self.model.driver_features;
        assert_eq!(
            acked & !offered,
            0,
            "FEATURES_OK with unoffered features {acked:#x} (offered {offered:#x})"
        );
        assert_ne!(
            acked & VIRTIO_F_VERSION_1,
            0,
            "FEATURES_OK without VERSION_1"
        );
    }

    /// What the device offers, as the driver read it at the start.
    fn transport_offered(&self) -> u64 {
        self.offered.unwrap_or(0)
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let driver_ok = self.model.status & status::DRIVER_OK != 0;
        match offset {
            DEVICE_FEATURES_SEL => self.model.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.model.driver_features_sel = value,
            DRIVER_FEATURES if !driver_ok => match self.model.driver_features_sel {
                0 => {
                    self.model.driver_features =
                        (self.model.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.model.driver_features =
                        (self.model.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            _ => {}
        }
        self.transport.write(offset, &value.to_le_bytes());
        if offset == STATUS {
            if value == 0 {
                self.model = DriverModel::default();
                let now = self.read32(STATUS);
                assert_eq!(now, 0, "status after a reset");
            } else {
                let before = self.model.status;
                self.model.status = self.read32(STATUS);
                if self.model.status & !before & status::FEATURES_OK != 0 {
                    self.check_negotiation();
                }
            }
        }
    }
}

/// Runs one input.
pub fn mmio_registers(data: &[u8]) {
    let fds_before = open_fds();
    let mut input = Input::new(data);
    let kind = input.u8();
    let offered = input.u64() & !VIRTIO_F_VERSION_1;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("cannot allocate guest memory");
    let irqfd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let transport = MmioTransport::new(
        device(kind, offered),
        mem.clone(),
        irqfd.try_clone().expect("eventfd clone"),
    )
    .expect("cannot create the transport");
    let mut bus = Bus {
        transport,
        mem,
        model: DriverModel::default(),
        offered: None,
    };
    // The driver learns what is offered first, as Linux does.
    for sel in [0, 1] {
        bus.write32(DEVICE_FEATURES_SEL, sel);
        bus.read32(0x010);
    }
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        one_op(&mut bus, &mut input);
    }
    drop(bus);
    assert!(irqfd.as_raw_fd() >= 0);
    drop(irqfd);
    assert_eq!(
        open_fds(),
        fds_before,
        "file descriptors outlived the transport"
    );
}

fn register(input: &mut Input) -> u64 {
    let pick = input.u8();
    if usize::from(pick) < REGISTERS.len() * 7 {
        REGISTERS[usize::from(pick) % REGISTERS.len()]
    } else {
        u64::from(input.u16() % 0x200)
    }
}

fn one_op(bus: &mut Bus, input: &mut Input) {
    match input.u8() % 8 {
        0..=2 => {
            let offset = register(input);
            let value = match input.u8() % 4 {
                0 => u32::from(input.u8()),
                1 => 1,
                _ => input.u32(),
            };
            bus.write32(offset, value);
        }
        3 => {
            let offset = register(input);
            bus.read32(offset);
        }
        4 => {
            let offset = register(input);
            let width = input.choose(&[1usize, 2, 3, 8]);
            if input.u8() & 1 == 0 {
                let mut data = vec![0u8; width];
                bus.transport.read(offset, &mut data);
            } else {
                let data = input.bytes(width).to_vec();
                bus.transport.write(offset, &data);
            }
        }
        5 => {
            let addr = u64::from(input.u32()) % MEM_SIZE as u64;
            let len = usize::from(input.u8());
            let bytes = input.bytes(len).to_vec();
            let _ = bus.mem.write_slice(&bytes, GuestAddress(addr));
        }
        6 => {
            // A queue set up the way Linux's virtio_mmio does.
            let queue = u32::from(input.u8() % 4);
            let size = u32::from(input.choose(&[1u16, 2, 16, 256, 3, 0, 1024]));
            let base = u64::from(input.u16()) << 4;
            bus.write32(0x030, queue);
            bus.read32(0x034);
            bus.write32(0x038, size);
            bus.write32(0x080, base as u32);
            bus.write32(0x084, 0);
            bus.write32(0x090, (base + 16 * u64::from(size)) as u32);
            bus.write32(0x094, 0);
            bus.write32(0x0a0, ((base + 0x4000) & !3) as u32);
            bus.write32(0x0a4, 0);
            bus.write32(0x044, 1);
        }
        _ => {
            // The status sequence of a driver, step by step.
            let step = input.u8() % 5;
            let value = match step {
                0 => status::ACKNOWLEDGE,
                1 => status::ACKNOWLEDGE | status::DRIVER,
                2 => {
                    let offered = bus.transport_offered();
                    bus.write32(DRIVER_FEATURES_SEL, 0);
                    bus.write32(DRIVER_FEATURES, offered as u32);
                    bus.write32(DRIVER_FEATURES_SEL, 1);
                    bus.write32(DRIVER_FEATURES, (offered >> 32) as u32);
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
                }
                3 => status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
                _ => 0,
            };
            bus.write32(STATUS, value);
        }
    }
}
