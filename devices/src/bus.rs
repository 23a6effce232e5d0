//! What a device looks like to the VMM's address buses.
//!
//! The VMM routes every guest port-I/O or MMIO access to the device that owns
//! the address and passes the offset inside that device's range; the buses
//! themselves live in the VMM. The trait lives here so the virtio-mmio
//! transport can implement it without depending on the VMM.

/// A device reachable through one of the VMM's buses.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` inside the device range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` inside the device range.
    fn write(&mut self, offset: u64, data: &[u8]);
}
