//! A simulated guest driver for the vsock unit tests.
//!
//! [`DriverQueue`] is the driver half of a split virtqueue (virtio 1.2,
//! 2.7) laid out in a `GuestMemoryMmap`: it posts descriptor chains and
//! reaps the used ring. [`Harness`] wires two of them (rx, tx) to a
//! [`Muxer`] through the real [`QueueProcessor`] and runs everything
//! synchronously on the test thread, so tests can interleave guest packets,
//! host socket I/O and device processing deterministically.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::model::QueueProcessor;
use super::muxer::{bind_listener, Muxer};
use super::packet::{op, PacketHeader, HDR_LEN, TYPE_STREAM};
use super::{VsockConfig, VsockTimeouts, HOST_CID};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "husk-vsock-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            let entry = GuestAddress(self.desc.0 + 16 * u64::from(index));
            mem.write_obj(addr.0, entry).unwrap();
            mem.write_obj(len, GuestAddress(entry.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(entry.0 + 12)).unwrap();
            mem.write_obj(next.unwrap_or(0), GuestAddress(entry.0 + 14))
                .unwrap();
        }
        let head = indexes[0];
        let slot = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
        self.chains[head as usize] = indexes;
        Some(head)
    }

    /// Reaps one used entry: (head, used length, the first `len` bytes of
    /// the chain's buffers).
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
            let desc_len: u32 = mem
                .read_obj(GuestAddress(self.desc.0 + 16 * u64::from(index) + 8))
                .unwrap();
            let take = (len as usize - data.len().min(len as usize)).min(desc_len as usize);
            let mut part = vec![0u8; take];
            mem.read_slice(&mut part, self.buffer(index)).unwrap();
            data.extend_from_slice(&part);
        }
        self.free.extend(indexes);
        Some((head, len, data))
    }
}

/// Size of the simulated guest's rx buffers: Linux's
/// `VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE` (4 KiB) plus the header.
pub const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;

/// The device model driven synchronously by a simulated guest.
pub struct Harness {
    pub mem: GuestMemoryMmap,
    pub muxer: Muxer,
    processor: QueueProcessor,
    rx_queue: Queue,
    tx_queue: Queue,
    rx_driver: DriverQueue,
    tx_driver: DriverQueue,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    /// Packets the guest received, oldest first.
    pub received: VecDeque<(PacketHeader, Vec<u8>)>,
    pub interrupts: usize,
    _dir: TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_timeouts(VsockTimeouts::default())
    }

    pub fn with_timeouts(timeouts: VsockTimeouts) -> Self {
        let dir = TempDir::new();
        let uds_path = dir.path().join("vsock.sock");
        let guest_cid = 3;
        let config = VsockConfig {
            guest_cid,
            uds_path: uds_path.clone(),
        };
        let listener = bind_listener(&uds_path).unwrap();
        let muxer = Muxer::new(&config, timeouts, listener).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx_driver = DriverQueue::new(&mem, 0x1000, QUEUE_SIZE, u64::from(RX_BUF_LEN));
        let tx_driver = DriverQueue::new(&mem, rx_driver.end(), QUEUE_SIZE, 0x1_1000);
        assert!(tx_driver.end() <= MEM_SIZE as u64);
        let mut harness = Self {
            rx_queue: rx_driver.device_queue(),
            tx_queue: tx_driver.device_queue(),
            mem,
            muxer,
            processor: QueueProcessor::default(),
            rx_driver,
            tx_driver,
            guest_cid,
            uds_path,
            received: VecDeque::new(),
            interrupts: 0,
            _dir: dir,
        };
        harness.refill_rx();
        harness
    }

    /// A guest-to-host header for a stream from guest port `src_port` to
    /// host port `dst_port`, advertising a 256 KiB window.
    pub fn guest_header(&self, op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: self.guest_cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Keeps every free rx descriptor posted.
    pub fn refill_rx(&mut self) {
        let empty = vec![0u8; RX_BUF_LEN as usize];
        while self.rx_driver.free_descriptors() > 0 {
            self.rx_driver
                .add_chain(&self.mem, &[(RX_BUF_LEN, true, &empty)])
                .unwrap();
        }
    }

    /// Posts a tx packet (header and payload in separate descriptors, like
    /// Linux) without processing it.
    pub fn post_tx(&mut self, header: &PacketHeader, payload: &[u8]) {
        let mut header = *header;
        if header.op == op::RW {
            header.len = payload.len() as u32;
        }
        let encoded = header.encode();
        let added = if payload.is_empty() {
            self.tx_driver
                .add_chain(&self.mem, &[(HDR_LEN as u32, false, &encoded)])
        } else {
            self.tx_driver.add_chain(
                &self.mem,
                &[
                    (HDR_LEN as u32, false, &encoded),
                    (payload.len() as u32, false, payload),
                ],
            )
        };
        assert!(added.is_some(), "tx ring full");
    }

    /// Sends one packet from the guest and lets the device react.
    pub fn send(&mut self, header: &PacketHeader, payload: &[u8]) {
        if self.tx_driver.free_descriptors() < 2 {
            self.pump();
        }
        self.post_tx(header, payload);
        self.pump();
    }

    /// One round of device work: host events, tx, rx; then the guest reaps
    /// used buffers and reposts rx buffers.
    pub fn pump(&mut self) {
        for _ in 0..64 {
            self.muxer.process_host_events();
            let tx = self
                .processor
                .process_tx(&mut self.tx_queue, &self.mem, &mut self.muxer)
                .unwrap();
            let rx = self
                .processor
                .process_rx(&mut self.rx_queue, &self.mem, &mut self.muxer)
                .unwrap();
            if tx || rx {
                self.interrupts += 1;
            }
            while self.tx_driver.pop_used(&self.mem).is_some() {}
            let mut got = false;
            while let Some((_, len, data)) = self.rx_driver.pop_used(&self.mem) {
                assert!(
                    len as usize >= HDR_LEN,
                    "rx used length {len} shorter than a header"
                );
                let header = PacketHeader::decode(data[..HDR_LEN].try_into().unwrap());
                assert_eq!(
                    header.len as usize + HDR_LEN,
                    len as usize,
                    "used length disagrees with header.len"
                );
                self.received.push_back((header, data[HDR_LEN..].to_vec()));
                got = true;
            }
            self.refill_rx();
            if !got && !self.muxer.has_rx() && !self.processor.tx_stalled() {
                break;
            }
        }
    }

    /// Pumps until `done` holds for the packets received so far, or panics
    /// after `timeout`.
    pub fn pump_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&VecDeque<(PacketHeader, Vec<u8>)>) -> bool,
    ) {
        let start = Instant::now();
        loop {
            self.pump();
            if done(&self.received) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out; received so far: {:?}",
                self.received
                    .iter()
                    .map(|(h, _)| (h.op, h.src_port, h.dst_port, h.len, h.flags))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pumps until a packet with `op` arrives and returns it (removing it
    /// and everything before it).
    pub fn expect_op(&mut self, op: u16) -> (PacketHeader, Vec<u8>) {
        self.pump_until(Duration::from_secs(5), |received| {
            received.iter().any(|(h, _)| h.op == op)
        });
        loop {
            let (header, data) = self.received.pop_front().unwrap();
            if header.op == op {
                return (header, data);
            }
        }
    }
}
