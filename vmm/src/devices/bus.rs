//! Address buses that route guest port-I/O and MMIO accesses to devices.
//!
//! A bus maps non-overlapping `[base, base + len)` ranges to devices. The
//! vCPU loop hands every exit for an address to the bus, which finds the
//! owning device and passes the offset inside that device's range. Port I/O
//! and MMIO use two separate `Bus` instances with the same logic. Devices
//! implement [`BusDevice`], which lives in `husk-devices` so the virtio-mmio
//! transport can implement it too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use husk_devices::BusDevice;

/// Errors from registering a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A zero-length range was requested.
    #[error("cannot register a zero-length range at {base:#x}")]
    ZeroLength { base: u64 },
    /// The range overlaps one that is already registered.
    #[error(
        "range {base:#x}+{len:#x} overlaps the registered range {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    /// The range wraps around the end of the address space.
    #[error("range {base:#x}+{len:#x} wraps around the address space")]
    Wraps { base: u64, len: u64 },
}

/// A shared, lockable bus device.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: SharedBusDevice,
}

/// A set of device ranges on one address space (port I/O or MMIO).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusEntry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base.checked_add(len).ok_or(BusError::Wraps { base, len })?;
        // The only candidates for overlap are the range starting at or
        // before `base` and the first range starting inside ours.
        let before = self.ranges.range(..=base).next_back();
        let after = self.ranges.range(base..end).next();
        for (&other_base, entry) in before.into_iter().chain(after) {
            if other_base < end && base < other_base + entry.len {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: entry.len,
                });
            }
        }
        self.ranges.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// The device owning `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(&SharedBusDevice, u64)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((&entry.device, offset))
    }

    /// Dispatches a guest read; returns false when no device owns `addr`
    /// (the caller then returns all-ones, like an unclaimed bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock_device(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock_device(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a previous holder panicked: device state is plain
/// register values, so continuing is safer than poisoning the whole VM.
fn lock_device(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn access_reaches_the_owning_device_with_its_offset() {
        let first = Arc::new(Mutex::new(Recorder::default()));
        let second = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(first.clone(), 0x1000, 0x100).unwrap();
        bus.insert(second.clone(), 0x2000, 0x100).unwrap();
        assert!(bus.write(0x2010, &[7]));
        assert!(first.lock().unwrap().writes.is_empty());
        assert_eq!(second.lock().unwrap().writes, vec![(0x10, vec![7])]);
        let mut data = [0u8; 1];
        assert!(bus.read(0x1005, &mut data));
        assert_eq!(data, [5]);
    }

    #[test]
    fn unclaimed_addresses_are_reported() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 0x10)
            .unwrap();
        assert!(!bus.write(0x1010, &[1]));
        assert!(!bus.read(0xfff, &mut [0]));
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = Bus::new();
        let device = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(device.clone(), 0x1000, 0x100).unwrap();
        for (base, len) in [(0x1000, 1), (0xfff, 2), (0x10ff, 1), (0x800, 0x1000)] {
            assert!(
                matches!(
                    bus.insert(device.clone(), base, len),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert(device.clone(), 0x1100, 1).unwrap();
        assert_eq!(
            bus.insert(device, 5, 0),
            Err(BusError::ZeroLength { base: 5 })
        );
    }
}
