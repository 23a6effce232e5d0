//! A simulated guest driver for the vsock unit tests.
//!
//! The driver half of each virtqueue is the test-support crate's
//! [`DriverQueue`]. [`Harness`] wires two of them (rx, tx) to a
//! [`Muxer`] through the real [`QueueProcessor`] and runs everything
//! synchronously on the test thread, so tests can interleave guest packets,
//! host socket I/O and device processing deterministically.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::model::QueueProcessor;
use super::muxer::{bind_listener, Muxer};
use super::packet::{op, PacketHeader, HDR_LEN, TYPE_STREAM};
use super::{VsockConfig, VsockTimeouts, DEFAULT_MAX_CONNECTIONS, HOST_CID};
use crate::guest_log::GuestLog;

pub use husk_test_support::tempdir::TestDir;
pub use husk_test_support::virtqueue::DriverQueue;

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
    _dir: TestDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_timeouts(VsockTimeouts::default())
    }

    pub fn with_timeouts(timeouts: VsockTimeouts) -> Self {
        Self::with_limits(timeouts, DEFAULT_MAX_CONNECTIONS, GuestLog::new())
    }

    /// A harness whose muxer holds at most `max_connections` streams and
    /// logs guest-triggered warnings on `guest_log`.
    pub fn with_limits(
        timeouts: VsockTimeouts,
        max_connections: usize,
        guest_log: GuestLog,
    ) -> Self {
        let dir = TestDir::new("vsock").unwrap();
        let uds_path = dir.path().join("vsock.sock");
        let guest_cid = 3;
        let config = VsockConfig {
            max_connections,
            ..VsockConfig::new(guest_cid, &uds_path)
        };
        let listener = bind_listener(&uds_path).unwrap();
        let muxer = Muxer::new(&config, timeouts, listener, guest_log).unwrap();
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
