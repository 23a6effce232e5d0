//! The driver's half of a split virtqueue (virtio 1.2, 2.7) in a
//! `GuestMemoryMmap`, for device-model tests: [`DriverQueue`] lays out the
//! descriptor table and rings, posts descriptor chains (each descriptor
//! with its own buffer, or pointing wherever the test says) and reaps the
//! used ring, as a guest driver would.
//! The device models' tests (vsock, virtio-fs, net, balloon) drive their
//! devices through it.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// VIRTQ_DESC_F_NEXT and VIRTQ_DESC_F_WRITE (virtio 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The driver side of one split virtqueue.
pub struct DriverQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    buffers: GuestAddress,
    buffer_stride: u64,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    chains: Vec<Vec<u16>>,
}

impl DriverQueue {
    /// A queue whose rings start at `base` and whose per-descriptor buffers
    /// (`buffer_stride` bytes each) follow them.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16, buffer_stride: u64) -> Self {
        let desc = GuestAddress(base);
        let avail = GuestAddress(base + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 3) & !3);
        let buffers = GuestAddress((used.0 + 6 + 8 * u64::from(size) + 4095) & !4095);
        mem.write_obj(0u16, avail).unwrap();
        mem.write_obj(0u16, GuestAddress(avail.0 + 2)).unwrap();
        mem.write_obj(0u16, used).unwrap();
        mem.write_obj(0u16, GuestAddress(used.0 + 2)).unwrap();
        Self {
            size,
            desc,
            avail,
            used,
            buffers,
            buffer_stride,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            chains: vec![Vec::new(); size as usize],
        }
    }

    /// How many chains the device has put in the used ring so far.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap()
    }

    /// Where this queue's memory ends.
    pub fn end(&self) -> u64 {
        self.buffers.0 + self.buffer_stride * u64::from(self.size)
    }

    /// The device's view of this queue.
    pub fn device_queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        queue.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        queue.set_ready(true);
        queue
    }

    /// Guest addresses of the descriptor table, available and used rings.
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        (self.desc.0, self.avail.0, self.used.0)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    fn buffer(&self, index: u16) -> GuestAddress {
        GuestAddress(self.buffers.0 + u64::from(index) * self.buffer_stride)
    }

    /// Posts a chain; each part is (length, device-writable, contents).
    /// Returns the head index, or None when out of descriptors.
    pub fn add_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(u32, bool, &[u8])],
    ) -> Option<u16> {
        if self.free.len() < parts.len() {
            return None;
        }
        let indexes: Vec<u16> = (0..parts.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, (&(len, writable, data), &index)) in parts.iter().zip(&indexes).enumerate() {
            assert!(u64::from(len) <= self.buffer_stride);
            let addr = self.buffer(index);
            mem.write_slice(data, addr).unwrap();
            let next = indexes.get(i + 1).copied();
            self.write_descriptor(mem, index, addr.0, len, writable, next);
        }
        Some(self.publish(mem, indexes))
    }

    /// Posts a chain whose descriptors point wherever the driver says
    /// instead of at this queue's buffers (a balloon report names guest
    /// pages, a hostile driver names anything); each part is (guest
    /// address, length, device-writable). Nothing is written at those
    /// addresses. Returns the head index, or None when out of descriptors.
    pub fn add_chain_at(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(u64, u32, bool)],
    ) -> Option<u16> {
        if self.free.len() < parts.len() || parts.is_empty() {
            return None;
        }
        let indexes: Vec<u16> = (0..parts.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, (&(addr, len, writable), &index)) in parts.iter().zip(&indexes).enumerate() {
            let next = indexes.get(i + 1).copied();
            self.write_descriptor(mem, index, addr, len, writable, next);
        }
        Some(self.publish(mem, indexes))
    }

    fn write_descriptor(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        writable: bool,
        next: Option<u16>,
    ) {
        let mut flags = if writable { DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        let entry = GuestAddress(self.desc.0 + 16 * u64::from(index));
        mem.write_obj(addr, entry).unwrap();
        mem.write_obj(len, GuestAddress(entry.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(entry.0 + 12)).unwrap();
        mem.write_obj(next.unwrap_or(0), GuestAddress(entry.0 + 14))
            .unwrap();
    }

    /// Makes the chain headed by `indexes[0]` available.
    fn publish(&mut self, mem: &GuestMemoryMmap, indexes: Vec<u16>) -> u16 {
        let head = indexes[0];
        let slot = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
        self.chains[head as usize] = indexes;
        head
    }

    /// Reaps one used entry: (head, used length, the first `len` bytes the
    /// device wrote, from the chain's device-writable buffers in order).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32, Vec<u8>)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap();
        if used_idx == self.last_used {
            return None;
        }
        let entry = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.last_used % self.size));
        let head = mem.read_obj::<u32>(entry).unwrap() as u16;
        let len: u32 = mem.read_obj(GuestAddress(entry.0 + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        let indexes = std::mem::take(&mut self.chains[head as usize]);
        let mut data = Vec::new();
        for &index in &indexes {
            let entry = GuestAddress(self.desc.0 + 16 * u64::from(index));
            let flags: u16 = mem.read_obj(GuestAddress(entry.0 + 12)).unwrap();
            if flags & DESC_F_WRITE == 0 {
                continue;
            }
            let desc_len: u32 = mem.read_obj(GuestAddress(entry.0 + 8)).unwrap();
            let take = (len as usize - data.len().min(len as usize)).min(desc_len as usize);
            let mut part = vec![0u8; take];
            mem.read_slice(&mut part, self.buffer(index)).unwrap();
            data.extend_from_slice(&part);
        }
        self.free.extend(indexes);
        Some((head, len, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_the_device_used_comes_back_with_only_what_it_wrote() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut driver = DriverQueue::new(&mem, 0, 8, 0x1000);
        let head = driver
            .add_chain(&mem, &[(4, false, b"ping"), (16, true, &[])])
            .unwrap();
        assert_eq!(driver.free_descriptors(), 6);
        let mut device = driver.device_queue();
        let chain = device.pop_descriptor_chain(&mem).unwrap();
        let descriptors: Vec<_> = chain.collect();
        assert_eq!(descriptors.len(), 2);
        assert!(!descriptors[0].is_write_only() && descriptors[1].is_write_only());
        mem.write_slice(b"pong", descriptors[1].addr()).unwrap();
        device.add_used(&mem, head, 4).unwrap();
        assert_eq!(driver.used_idx(&mem), 1);
        assert_eq!(driver.pop_used(&mem), Some((head, 4, b"pong".to_vec())));
        assert_eq!(driver.free_descriptors(), 8);
        assert_eq!(driver.pop_used(&mem), None);
    }
}
