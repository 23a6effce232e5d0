//! Unit tests of the net model and both adapters, over a fake TAP: one end
//! of an `AF_UNIX` `SOCK_SEQPACKET` pair is the device's frame fd (one
//! record per frame, header first, as a TAP with `IFF_VNET_HDR` reads and
//! writes them), the other is the host network the test plays. The guest
//! is the test-support crate's [`DriverQueue`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_test_support::virtqueue::DriverQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::model::{
    Counters, NetModel, PumpOutcome, BASE_FEATURES, CSUM, EVENT_IDX, GUEST_CSUM, GUEST_TSO4,
    HOST_TSO4, MAX_FRAME_LEN, MRG_RXBUF, PUMP_BUDGET,
};
use super::tap::{FrameDevice, TapOffloads};
use super::{NetConfig, NetDevice, NetError, NetStats, VIRTIO_ID_NET, VNET_HDR_LEN};
use crate::guest_log::{Clock, GuestLog, GUEST_LOG_BURST, GUEST_LOG_INTERVAL};
use crate::{ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const WAIT: Duration = Duration::from_secs(5);
const MEM_SIZE: usize = 16 << 20;
const QUEUE_SIZE: u16 = 16;
/// VIRTQ_DESC_F_WRITE (virtio 1.2, 2.7.5).
const DESC_F_WRITE: u16 = 2;
const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x01];

/// A TAP stand-in: a seqpacket pair, and the offloads asked of it.
struct FakeTap {
    device_end: OwnedFd,
    supported: TapOffloads,
    offloads_set: Mutex<Vec<TapOffloads>>,
}

impl FrameDevice for FakeTap {
    fn name(&self) -> &str {
        "faketap0"
    }
    fn frame_fd(&self) -> BorrowedFd<'_> {
        self.device_end.as_fd()
    }
    fn supported_offloads(&self) -> TapOffloads {
        self.supported
    }
    fn set_offloads(&self, offloads: TapOffloads) -> std::io::Result<()> {
        self.offloads_set.lock().unwrap().push(offloads);
        Ok(())
    }
}

impl FakeTap {
    fn last_offloads(&self) -> Option<TapOffloads> {
        self.offloads_set.lock().unwrap().last().copied()
    }
}

/// The host network's end of a fake TAP.
struct Host(OwnedFd);

impl Host {
    /// Queues one frame for the guest, as the TAP would deliver it.
    fn send(&self, header: &[u8; VNET_HDR_LEN], frame: &[u8]) {
        let mut record = header.to_vec();
        record.extend_from_slice(frame);
        // SAFETY: a live buffer of the given length.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                record.as_ptr().cast(),
                record.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(
            sent,
            record.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next record the device wrote, within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut poll = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
        if ready <= 0 {
            return None;
        }
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 64];
        // SAFETY: a live buffer of the given length.
        let got = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert!(got >= 0, "{}", std::io::Error::last_os_error());
        buf.truncate(got as usize);
        Some(buf)
    }
}

fn fake_tap(supported: TapOffloads) -> (Arc<FakeTap>, Host) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array, checked below.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and nothing else owns them.
    let (device_end, host_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let tap = Arc::new(FakeTap {
        device_end,
        supported,
        offloads_set: Mutex::new(Vec::new()),
    });
    (tap, Host(host_end))
}

const ALL_OFFLOADS: TapOffloads = TapOffloads {
    csum: true,
    tso4: true,
    tso6: true,
};

/// A virtio-net header with `flags`, `gso_type` and zeros elsewhere.
fn vnet_header(flags: u8, gso_type: u8) -> [u8; VNET_HDR_LEN] {
    let mut header = [0u8; VNET_HDR_LEN];
    header[0] = flags;
    header[1] = gso_type;
    header
}

/// An Ethernet frame of `len` bytes to MAC whose payload counts up from
/// `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    assert!(len >= 14);
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend((0..len - 14).map(|i| seed.wrapping_add(i as u8)));
    frame
}

/// The model driven synchronously by a simulated guest.
struct Harness {
    mem: GuestMemoryMmap,
    model: NetModel,
    rx_queue: Queue,
    tx_queue: Queue,
    rx_driver: DriverQueue,
    tx_driver: DriverQueue,
    tap: Arc<FakeTap>,
    host: Host,
    counters: Arc<Counters>,
}

impl Harness {
    /// A session with `features` acked, over a TAP supporting `supported`,
    /// whose receive buffers are `rx_buffer_len` bytes at most.
    fn new(features: u64, supported: TapOffloads, rx_buffer_len: u64) -> Self {
        Self::build(
            features,
            supported,
            (QUEUE_SIZE, rx_buffer_len, 0x2_0000),
            GuestLog::new(),
        )
    }

    fn with_guest_log(
        features: u64,
        supported: TapOffloads,
        rx_buffer_len: u64,
        guest_log: GuestLog,
    ) -> Self {
        Self::build(
            features,
            supported,
            (QUEUE_SIZE, rx_buffer_len, 0x2_0000),
            guest_log,
        )
    }

    /// `(queue size, largest rx buffer, largest tx descriptor)` in `layout`.
    fn build(
        features: u64,
        supported: TapOffloads,
        layout: (u16, u64, u64),
        guest_log: GuestLog,
    ) -> Self {
        let (queue_size, rx_buffer_len, tx_buffer_len) = layout;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx_driver = DriverQueue::new(&mem, 0x1000, queue_size, rx_buffer_len);
        let tx_driver = DriverQueue::new(&mem, rx_driver.end(), queue_size, tx_buffer_len);
        assert!(tx_driver.end() <= MEM_SIZE as u64);
        let (tap, host) = fake_tap(supported);
        let counters = Arc::new(Counters::default());
        let mut model = NetModel::new(tap.clone(), counters.clone(), guest_log);
        model.set_acked_features(VIRTIO_F_VERSION_1 | features);
        Self {
            rx_queue: rx_driver.device_queue(),
            tx_queue: tx_driver.device_queue(),
            mem,
            model,
            rx_driver,
            tx_driver,
            tap,
            host,
            counters,
        }
    }

    /// One pump; `rx_event` as a receive kick or a TAP edge would say.
    fn pump(&mut self, rx_event: bool) -> PumpOutcome {
        self.model
            .pump(&self.mem, &mut self.rx_queue, &mut self.tx_queue, rx_event)
            .unwrap()
    }

    fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// Posts `count` empty receive buffers of `len` bytes.
    fn post_rx(&mut self, count: usize, len: u32) {
        for _ in 0..count {
            self.rx_driver
                .add_chain(&self.mem, &[(len, true, &[])])
                .unwrap();
        }
    }

    /// Posts a transmit chain, each part one descriptor.
    fn post_tx(&mut self, parts: &[&[u8]]) -> u16 {
        let parts: Vec<(u32, bool, &[u8])> = parts
            .iter()
            .map(|part| (part.len() as u32, false, *part))
            .collect();
        self.tx_driver.add_chain(&self.mem, &parts).unwrap()
    }

    /// Points descriptor `index` of `driver`'s table at `addr` instead.
    fn redirect_descriptor(&self, driver: &DriverQueue, index: u16, addr: u64) {
        let (desc, _, _) = driver.ring_addresses();
        self.mem
            .write_obj(addr, GuestAddress(desc + 16 * u64::from(index)))
            .unwrap();
    }

    /// Every used receive entry so far: (used length, bytes written).
    fn rx_used(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut used = Vec::new();
        while let Some((_, len, data)) = self.rx_driver.pop_used(&self.mem) {
            used.push((len, data));
        }
        used
    }

    fn tx_used(&mut self) -> Vec<u32> {
        let mut used = Vec::new();
        while let Some((_, len, _)) = self.tx_driver.pop_used(&self.mem) {
            used.push(len);
        }
        used
    }
}

fn num_buffers(header: &[u8]) -> u16 {
    u16::from_le_bytes([header[10], header[11]])
}

// ---- configuration ----------------------------------------------------------

#[test]
fn config_validation_names_the_field_at_fault() {
    let zero = NetConfig::new([0; 6]).validate().unwrap_err();
    assert!(matches!(zero, NetError::InvalidMac { .. }));
    assert!(zero.to_string().contains("`mac`"), "{zero}");
    let multicast = NetConfig::new([0x01, 0, 0x5e, 0, 0, 1])
        .validate()
        .unwrap_err();
    assert!(
        multicast.to_string().contains("01:00:5e:00:00:01")
            && multicast.to_string().contains("multicast"),
        "{multicast}"
    );
    let broadcast = NetConfig::new([0xff; 6]).validate();
    assert!(matches!(broadcast, Err(NetError::InvalidMac { .. })));
    let tiny = NetConfig { mac: MAC, mtu: 67 }.validate().unwrap_err();
    assert!(
        tiny.to_string().contains("`mtu`") && tiny.to_string().contains("67"),
        "{tiny}"
    );
    assert!(NetConfig { mac: MAC, mtu: 68 }.validate().is_ok());
    assert!(NetConfig {
        mac: MAC,
        mtu: u16::MAX
    }
    .validate()
    .is_ok());
}

#[test]
fn mmio_device_offers_no_offload_over_a_tap_without_any() {
    let (tap, _host) = fake_tap(TapOffloads::NONE);
    let device = NetDevice::with_frame_device(tap, NetConfig::new(MAC)).unwrap();
    assert_eq!(device.device_type(), VIRTIO_ID_NET);
    assert_eq!(device.queue_max_sizes().len(), 2);
    let features = device.available_features();
    assert_eq!(features, BASE_FEATURES);
    for offload in [CSUM, GUEST_CSUM, HOST_TSO4, GUEST_TSO4] {
        assert_eq!(features & offload, 0, "offload {offload:#x} offered");
    }
    assert_ne!(features & MRG_RXBUF, 0);
    assert_ne!(features & EVENT_IDX, 0);
    assert_ne!(features & (1 << 5), 0, "VIRTIO_NET_F_MAC");
    assert_ne!(features & (1 << 3), 0, "VIRTIO_NET_F_MTU");
    assert_eq!(features & (1 << 22), 0, "VIRTIO_NET_F_MQ");
    assert_eq!(features & (1 << 17), 0, "VIRTIO_NET_F_CTRL_VQ");

    let (tap, _host) = fake_tap(ALL_OFFLOADS);
    let device = NetDevice::with_frame_device(tap, NetConfig::new(MAC)).unwrap();
    let features = device.available_features();
    assert_eq!(
        features & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4),
        CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4
    );
}

#[test]
fn mmio_config_space_holds_the_mac_and_the_mtu() {
    let (tap, _host) = fake_tap(TapOffloads::NONE);
    let device = NetDevice::with_frame_device(
        tap,
        NetConfig {
            mac: MAC,
            mtu: 1400,
        },
    )
    .unwrap();
    let mut space = [0u8; 12];
    device.read_config(0, &mut space);
    assert_eq!(&space[..6], &MAC);
    assert_eq!(u16::from_le_bytes([space[10], space[11]]), 1400);
    let mut one = [0u8; 1];
    device.read_config(5, &mut one);
    assert_eq!(one[0], MAC[5]);
}

#[test]
fn acked_guest_offloads_are_set_on_the_tap_within_what_it_supports() {
    let supported = TapOffloads {
        csum: true,
        tso4: true,
        tso6: false,
    };
    let harness = Harness::new(
        GUEST_CSUM | GUEST_TSO4 | super::model::GUEST_TSO6 | CSUM,
        supported,
        0x1000,
    );
    assert_eq!(harness.tap.last_offloads(), Some(supported));
    let harness = Harness::new(CSUM | HOST_TSO4, ALL_OFFLOADS, 0x1000);
    assert_eq!(
        harness.tap.last_offloads(),
        Some(TapOffloads::NONE),
        "host-side offloads need nothing of the TAP"
    );
}

// ---- transmit -----------------------------------------------------------------

#[test]
fn tx_frame_reaches_the_tap_as_one_write_of_its_header_and_frame() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    let header = vnet_header(0, 0);
    let sent = frame(72, 7);
    // The header ends five bytes into the second descriptor and the frame
    // continues in a third, as a driver may lay it out.
    let mut wire = header.to_vec();
    wire.extend_from_slice(&sent);
    h.post_tx(&[&wire[..7], &wire[7..30], &wire[30..]]);
    let outcome = h.pump(false);
    assert!(outcome.tx_used && !outcome.more);
    let record = h.host.recv(WAIT).expect("a frame on the TAP");
    assert_eq!(
        &record[..VNET_HDR_LEN],
        &header,
        "the header leads the write"
    );
    assert_eq!(&record[VNET_HDR_LEN..], &sent[..], "then exactly the frame");
    assert_eq!(h.tx_used(), vec![0]);
    let stats = h.stats();
    assert_eq!(
        (stats.tx_packets, stats.tx_bytes, stats.tx_errors),
        (1, 72, 0)
    );
    assert!(h.host.recv(Duration::from_millis(20)).is_none());
}

#[test]
fn a_tx_chain_whose_kick_was_lost_goes_out_on_the_next_event_of_any_kind() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    let sent = frame(60, 11);
    h.post_tx(&[&vnet_header(0, 0), &sent]);
    // No transmit kick: a TAP edge wakes the device.
    assert!(h.pump(true).tx_used);
    let record = h.host.recv(WAIT).expect("the frame went out");
    assert_eq!(&record[VNET_HDR_LEN..], &sent[..]);
}

#[test]
fn tx_checksum_offload_passes_to_the_tap_only_when_negotiated() {
    let partial = vnet_header(
        virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        0,
    );
    let mut h = Harness::new(CSUM, ALL_OFFLOADS, 0x1000);
    h.post_tx(&[&partial, &frame(60, 1)]);
    h.pump(false);
    let record = h.host.recv(WAIT).unwrap();
    assert_eq!(&record[..VNET_HDR_LEN], &partial);

    let mut h = Harness::new(0, ALL_OFFLOADS, 0x1000);
    h.post_tx(&[&partial, &frame(60, 1)]);
    h.pump(false);
    assert!(h.host.recv(Duration::from_millis(20)).is_none());
    assert_eq!(h.stats().tx_errors, 1);
    assert_eq!(h.tx_used(), vec![0], "the refused chain is returned");
}

#[test]
fn hostile_tx_chains_are_counted_returned_empty_and_do_not_stop_the_device() {
    let mut h = Harness::new(0, TapOffloads::NONE, 0x1000);
    let header = vnet_header(0, 0);
    // A descriptor pointing past the end of guest memory.
    let outside = h.post_tx(&[&header, &frame(60, 2)]);
    let (tx_driver, mem) = (&h.tx_driver, &h.mem);
    let (desc, _, _) = tx_driver.ring_addresses();
    let next: u16 = mem
        .read_obj(GuestAddress(desc + 16 * u64::from(outside) + 14))
        .unwrap();
    h.redirect_descriptor(&h.tx_driver, next, MEM_SIZE as u64 - 8);
    // A device-writable descriptor in a transmit chain.
    h.tx_driver
        .add_chain(&h.mem, &[(12, false, &header), (60, true, &[])])
        .unwrap();
    // More than a header and the largest frame.
    let big = vec![0u8; 40_000];
    h.post_tx(&[&header, &big, &big]);
    // Shorter than a header and an Ethernet header.
    h.post_tx(&[&header, &[0u8; 13]]);
    // Then a good one.
    let good = frame(64, 9);
    h.post_tx(&[&header, &good]);
    let outcome = h.pump(false);
    assert!(outcome.tx_used);
    assert_eq!(h.tx_used(), vec![0; 5]);
    let record = h.host.recv(WAIT).unwrap();
    assert_eq!(
        &record[VNET_HDR_LEN..],
        &good[..],
        "only the good frame left"
    );
    assert!(h.host.recv(Duration::from_millis(20)).is_none());
    let stats = h.stats();
    assert_eq!((stats.tx_errors, stats.tx_packets), (4, 1));
}

/// A clock that never moves: every guest-log line falls in one window.
struct FrozenClock(Instant);

impl Clock for FrozenClock {
    fn now(&self) -> Instant {
        self.0
    }
}

#[test]
fn a_flood_of_malformed_tx_chains_is_counted_and_logged_within_the_budget() {
    let log = GuestLog::with_clock(
        GUEST_LOG_BURST,
        GUEST_LOG_INTERVAL,
        Box::new(FrozenClock(Instant::now())),
    );
    let mut h = Harness::with_guest_log(0, TapOffloads::NONE, 0x1000, log.clone());
    for _ in 0..3 {
        for _ in 0..QUEUE_SIZE {
            h.post_tx(&[&[0u8; 4]]);
        }
        h.pump(false);
        h.tx_used();
    }
    let total = 3 * u64::from(QUEUE_SIZE);
    assert_eq!(h.stats().tx_errors, total);
    assert_eq!(log.written_total(), u64::from(GUEST_LOG_BURST));
    assert_eq!(log.suppressed_total(), total - u64::from(GUEST_LOG_BURST));
}

// ---- receive ------------------------------------------------------------------

#[test]
fn rx_frame_is_split_over_two_small_mergeable_buffers_with_num_buffers_2() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    h.post_rx(2, 64);
    let sent = frame(100, 3);
    h.host.send(&vnet_header(0, 0), &sent);
    let outcome = h.pump(true);
    assert!(outcome.rx_used && !outcome.more);
    let used = h.rx_used();
    assert_eq!(
        used.iter().map(|(len, _)| *len).collect::<Vec<_>>(),
        vec![64, (VNET_HDR_LEN + 100 - 64) as u32]
    );
    let mut joined = used[0].1.clone();
    joined.extend_from_slice(&used[1].1);
    assert_eq!(num_buffers(&joined), 2);
    assert_eq!(&joined[VNET_HDR_LEN..], &sent[..]);
    let stats = h.stats();
    assert_eq!(
        (stats.rx_packets, stats.rx_bytes, stats.rx_dropped),
        (1, 100, 0)
    );
}

#[test]
fn rx_frame_that_fits_one_buffer_says_num_buffers_1() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    h.post_rx(4, 2048);
    let sent = frame(1514, 4);
    h.host.send(&vnet_header(0, 0), &sent);
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(num_buffers(&used[0].1), 1);
    assert_eq!(&used[0].1[VNET_HDR_LEN..], &sent[..]);
}

#[test]
fn rx_with_no_buffers_waits_without_reading_on_and_resumes_on_kick() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    let first = frame(200, 10);
    let second = frame(300, 20);
    h.host.send(&vnet_header(0, 0), &first);
    h.host.send(&vnet_header(0, 0), &second);
    // The TAP is readable, the guest has posted nothing.
    let outcome = h.pump(true);
    assert_eq!(
        outcome,
        PumpOutcome::default(),
        "nothing used, nothing left to spin on"
    );
    // Further TAP edges and transmit kicks do not read on or drop.
    for _ in 0..3 {
        assert_eq!(h.pump(true), PumpOutcome::default());
    }
    assert_eq!(h.stats().rx_dropped, 0);
    // One buffer: the first frame lands, the second waits.
    h.post_rx(1, 1024);
    let outcome = h.pump(true);
    assert!(outcome.rx_used);
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(&used[0].1[VNET_HDR_LEN..], &first[..]);
    h.post_rx(1, 1024);
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(&used[0].1[VNET_HDR_LEN..], &second[..]);
    let stats = h.stats();
    assert_eq!(
        (stats.rx_packets, stats.rx_dropped, stats.rx_errors),
        (2, 0, 0)
    );
}

#[test]
fn rx_frame_larger_than_the_buffers_posted_so_far_waits_for_more_and_keeps_the_ring_whole() {
    let mut h = Harness::new(MRG_RXBUF | EVENT_IDX, TapOffloads::NONE, 0x1000);
    h.rx_queue.set_event_idx(true);
    let sent = frame(1000, 30);
    h.host.send(&vnet_header(0, 0), &sent);
    // 2 x 256 bytes cannot hold 1012: the chains are handed back.
    h.post_rx(2, 256);
    assert!(!h.pump(true).rx_used);
    assert_eq!(h.rx_used().len(), 0);
    assert_eq!(
        h.rx_queue.next_avail(),
        0,
        "the ring is rewound, no chain kept"
    );
    // avail_event sits after the used ring (virtio 1.2, 2.7.8):
    // the driver is asked to kick when it adds past the two it posted.
    let (_, _, used) = h.rx_driver.ring_addresses();
    let avail_event: u16 = h
        .mem
        .read_obj(GuestAddress(used + 4 + 8 * u64::from(QUEUE_SIZE)))
        .unwrap();
    assert_eq!(avail_event, 2);
    h.post_rx(3, 256);
    assert!(h.pump(true).rx_used);
    let used = h.rx_used();
    assert_eq!(used.len(), 4, "1012 bytes in 256-byte buffers");
    let joined: Vec<u8> = used.iter().flat_map(|(_, data)| data.clone()).collect();
    assert_eq!(num_buffers(&joined), 4);
    assert_eq!(&joined[VNET_HDR_LEN..], &sent[..]);
    assert_eq!(h.rx_queue.next_avail(), 4, "the fifth buffer stays posted");
}

#[test]
fn rx_without_mergeable_buffers_drops_a_frame_too_big_for_one_buffer_and_keeps_the_buffer() {
    let mut h = Harness::new(0, TapOffloads::NONE, 0x1000);
    h.post_rx(1, 1024);
    h.host.send(&vnet_header(0, 0), &frame(2000, 1));
    let small = frame(500, 2);
    h.host.send(&vnet_header(0, 0), &small);
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(num_buffers(&used[0].1), 1);
    assert_eq!(&used[0].1[VNET_HDR_LEN..], &small[..]);
    let stats = h.stats();
    assert_eq!((stats.rx_packets, stats.rx_dropped), (1, 1));
}

#[test]
fn rx_frames_with_offloads_the_guest_did_not_negotiate_are_dropped() {
    let needs_csum = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let tcpv4 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    let mut h = Harness::new(MRG_RXBUF, ALL_OFFLOADS, 0x1000);
    h.post_rx(4, 2048);
    h.host.send(&vnet_header(needs_csum, 0), &frame(100, 1));
    h.host.send(&vnet_header(needs_csum, tcpv4), &frame(100, 2));
    let plain = frame(100, 3);
    h.host.send(&vnet_header(2, 0), &plain);
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1[0], 0, "DATA_VALID is cleared without GUEST_CSUM");
    assert_eq!(&used[0].1[VNET_HDR_LEN..], &plain[..]);
    assert_eq!(h.stats().rx_dropped, 2);

    let mut h = Harness::new(MRG_RXBUF | GUEST_CSUM | GUEST_TSO4, ALL_OFFLOADS, 0x1000);
    h.post_rx(4, 2048);
    h.host.send(&vnet_header(needs_csum, tcpv4), &frame(100, 2));
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!((used[0].1[0], used[0].1[1]), (needs_csum, tcpv4));
}

#[test]
fn hostile_rx_chains_are_returned_empty_and_counted_and_the_frame_goes_to_the_next_good_one() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    // Outside guest memory.
    let outside = h.rx_driver.add_chain(&h.mem, &[(512, true, &[])]).unwrap();
    h.redirect_descriptor(&h.rx_driver, outside, MEM_SIZE as u64 - 100);
    // A device-readable descriptor in a receive chain.
    h.rx_driver
        .add_chain(&h.mem, &[(512, false, &[0u8; 512])])
        .unwrap();
    // Smaller than the header.
    h.post_rx(1, 8);
    h.post_rx(1, 2048);
    let sent = frame(300, 5);
    h.host.send(&vnet_header(0, 0), &sent);
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(
        used.iter().map(|(len, _)| *len).collect::<Vec<_>>(),
        vec![0, 0, 0, (VNET_HDR_LEN + 300) as u32]
    );
    assert_eq!(&used[3].1[VNET_HDR_LEN..], &sent[..]);
    let stats = h.stats();
    assert_eq!((stats.rx_errors, stats.rx_packets), (3, 1));
}

#[test]
fn a_malformed_rx_chain_behind_a_taken_one_makes_the_taken_one_go_back_empty() {
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    let sent = frame(1000, 8);
    h.host.send(&vnet_header(0, 0), &sent);
    h.post_rx(1, 256);
    h.rx_driver
        .add_chain(&h.mem, &[(256, false, &[0u8; 256])])
        .unwrap();
    // The ring cannot be rewound past the malformed chain, which was used:
    // the good one goes back empty rather than being lost to the guest.
    assert!(h.pump(true).rx_used);
    assert_eq!(
        h.rx_used().iter().map(|(len, _)| *len).collect::<Vec<_>>(),
        vec![0, 0]
    );
    assert_eq!(h.stats().rx_errors, 1);
    // The frame still waits, and lands once the ring can hold it.
    h.post_rx(4, 256);
    assert!(h.pump(true).rx_used);
    let used = h.rx_used();
    let joined: Vec<u8> = used.iter().flat_map(|(_, data)| data.clone()).collect();
    assert_eq!(num_buffers(&joined), 4);
    assert_eq!(&joined[VNET_HDR_LEN..], &sent[..]);
    assert_eq!(h.stats().rx_dropped, 0);
}

#[test]
fn a_looping_rx_chain_is_cut_at_the_queue_size_and_does_not_hang() {
    // A chain whose descriptor names itself as next: virtio-queue ends it
    // after as many descriptors as the queue has.
    let mut h = Harness::new(MRG_RXBUF, TapOffloads::NONE, 0x1000);
    let head = h.rx_driver.add_chain(&h.mem, &[(512, true, &[])]).unwrap();
    let (desc, _, _) = h.rx_driver.ring_addresses();
    let entry = desc + 16 * u64::from(head);
    h.mem
        .write_obj(DESC_F_WRITE | 1, GuestAddress(entry + 12))
        .unwrap();
    h.mem.write_obj(head, GuestAddress(entry + 14)).unwrap();
    h.post_rx(1, 2048);
    h.host.send(&vnet_header(0, 0), &frame(100, 1));
    h.pump(true);
    let used = h.rx_used();
    assert_eq!(
        used.last().map(|(len, _)| *len),
        Some((VNET_HDR_LEN + 100) as u32)
    );
    assert_eq!(h.stats().rx_packets, 1);
}

#[test]
fn rx_stops_at_its_budget_says_work_is_left_and_resumes_where_it_stopped() {
    let mut h = Harness::build(
        MRG_RXBUF,
        TapOffloads::NONE,
        (512, 128, 0x100),
        GuestLog::new(),
    );
    let frames = PUMP_BUDGET + 3;
    for i in 0..frames {
        h.host.send(&vnet_header(0, 0), &frame(60, i as u8));
    }
    h.post_rx(512, 128);
    let first = h.pump(true);
    assert!(first.rx_used && first.more, "{first:?}");
    assert_eq!(h.rx_used().len(), PUMP_BUDGET);
    // The adapter comes back without a new event.
    let second = h.pump(true);
    assert!(second.rx_used && !second.more, "{second:?}");
    let rest = h.rx_used();
    assert_eq!(rest.len(), 3);
    assert_eq!(rest[2].1[VNET_HDR_LEN + 14], (frames - 1) as u8, "in order");
    assert_eq!(h.stats().rx_packets, frames as u64);
}

// ---- MMIO adapter -------------------------------------------------------------

#[derive(Default)]
struct CountingInterrupt {
    used: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn mmio_worker_moves_frames_both_ways_and_stops_on_reset() {
    let (tap, host) = fake_tap(ALL_OFFLOADS);
    let mut device = NetDevice::with_frame_device(tap.clone(), NetConfig::new(MAC)).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut tx = DriverQueue::new(&mem, rx.end(), 16, 0x1000);
    for _ in 0..4 {
        rx.add_chain(&mem, &[(0x1000, true, &[])]).unwrap();
    }
    let tx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let queues = vec![
        ActivatedQueue {
            queue: rx.device_queue(),
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        },
        ActivatedQueue {
            queue: tx.device_queue(),
            notifier: tx_notify.try_clone().unwrap(),
        },
    ];
    device.set_acked_features(VIRTIO_F_VERSION_1 | MRG_RXBUF | EVENT_IDX | GUEST_CSUM);
    let interrupt = Arc::new(CountingInterrupt::default());
    device
        .activate(mem.clone(), interrupt.clone(), queues)
        .unwrap();
    assert!(device.is_active());
    assert_eq!(
        tap.last_offloads(),
        Some(TapOffloads {
            csum: true,
            ..TapOffloads::NONE
        })
    );

    let inbound = frame(120, 40);
    host.send(&vnet_header(0, 0), &inbound);
    let (_, len, data) = wait_for("an rx frame from the worker", || rx.pop_used(&mem));
    assert_eq!(len as usize, VNET_HDR_LEN + 120);
    assert_eq!(&data[VNET_HDR_LEN..], &inbound[..]);
    assert!(interrupt.used.load(Ordering::SeqCst) >= 1);

    let outbound = frame(80, 50);
    let mut wire = vnet_header(0, 0).to_vec();
    wire.extend_from_slice(&outbound);
    tx.add_chain(&mem, &[(wire.len() as u32, false, &wire)])
        .unwrap();
    tx_notify.write(1).unwrap();
    let record = host.recv(WAIT).expect("a tx frame from the worker");
    assert_eq!(&record[VNET_HDR_LEN..], &outbound[..]);
    wait_for("the tx chain back", || tx.pop_used(&mem));

    let stats = device.stats();
    assert_eq!((stats.rx_packets, stats.tx_packets), (1, 1));
    device.reset();
    assert!(!device.is_active());
    // Stopped: frames wait in the TAP.
    host.send(&vnet_header(0, 0), &inbound);
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.pop_used(&mem).is_none());
    assert_eq!(device.stats(), stats, "counters survive the reset");
}

#[test]
fn a_paused_mmio_device_holds_frames_in_the_tap_and_delivers_them_after_resume() {
    let (tap, host) = fake_tap(ALL_OFFLOADS);
    let mut device = NetDevice::with_frame_device(tap.clone(), NetConfig::new(MAC)).unwrap();
    assert!(device.pause().is_err(), "nothing runs before activation");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let tx = DriverQueue::new(&mem, rx.end(), 16, 0x1000);
    for _ in 0..4 {
        rx.add_chain(&mem, &[(0x1000, true, &[])]).unwrap();
    }
    let notifiers: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let activated = |queues: Vec<virtio_queue::Queue>| -> Vec<ActivatedQueue> {
        queues
            .into_iter()
            .zip(&notifiers)
            .map(|(queue, notifier)| ActivatedQueue {
                queue,
                notifier: notifier.try_clone().unwrap(),
            })
            .collect()
    };
    device.set_acked_features(VIRTIO_F_VERSION_1 | MRG_RXBUF);
    let interrupt = Arc::new(CountingInterrupt::default());
    device
        .activate(
            mem.clone(),
            interrupt.clone(),
            activated(vec![rx.device_queue(), tx.device_queue()]),
        )
        .unwrap();
    host.send(&vnet_header(0, 0), &frame(60, 1));
    wait_for("the first rx frame", || rx.pop_used(&mem));

    let positions = device.pause().unwrap();
    assert!(!device.is_active());
    assert_eq!(
        positions
            .iter()
            .map(|p| (p.next_avail, p.next_used))
            .collect::<Vec<_>>(),
        vec![(1, 1), (0, 0)]
    );
    let held = frame(70, 2);
    host.send(&vnet_header(0, 0), &held);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        rx.pop_used(&mem).is_none(),
        "paused: the frame waits in the TAP"
    );

    let restored = positions
        .into_iter()
        .map(|state| virtio_queue::Queue::try_from(state).unwrap())
        .collect();
    device
        .activate(mem.clone(), interrupt, activated(restored))
        .unwrap();
    let (_, len, data) = wait_for("the held frame after resume", || rx.pop_used(&mem));
    assert_eq!(len as usize, VNET_HDR_LEN + 70);
    assert_eq!(&data[VNET_HDR_LEN..], &held[..]);
    device.reset();
}

#[test]
fn mmio_device_refuses_a_driver_with_the_wrong_queue_count() {
    let (tap, _host) = fake_tap(TapOffloads::NONE);
    let mut device = NetDevice::with_frame_device(tap, NetConfig::new(MAC)).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let rx = DriverQueue::new(&mem, 0x1000, 16, 0x100);
    let queues = vec![ActivatedQueue {
        queue: rx.device_queue(),
        notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
    }];
    let error = device
        .activate(mem, Arc::new(CountingInterrupt::default()), queues)
        .unwrap_err();
    assert!(matches!(
        error,
        crate::ActivateError::QueueCount {
            expected: 2,
            ready: 1
        }
    ));
    assert!(!device.is_active());
}

// ---- vhost-user adapter ---------------------------------------------------------

fn temp_dir() -> husk_test_support::tempdir::TestDir {
    husk_test_support::tempdir::TestDir::new("net").unwrap()
}

/// Plays QEMU's part: negotiates over vhost-user as QEMU 7.2's vhost-user
/// net client does, shares a memfd as guest memory, and drives the rings
/// as the guest driver would.
#[test]
fn vhost_user_frontend_negotiates_offloads_and_moves_frames_both_ways() {
    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vm_memory::{FileOffset, GuestMemory, GuestMemoryRegion};

    const MEM: usize = 8 << 20;
    let dir = temp_dir();
    let socket = dir.path().join("net.sock");
    let (tap, host) = fake_tap(ALL_OFFLOADS);
    let server =
        super::vhost_user::serve_frame_device(&socket, tap.clone(), NetConfig::new(MAC)).unwrap();

    // SAFETY: plain system call with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"husk-net-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh memfd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;

    let mut frontend = Frontend::connect(&socket, 2).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let wanted = VIRTIO_F_VERSION_1 | MRG_RXBUF | EVENT_IDX | CSUM | GUEST_CSUM | GUEST_TSO4;
    assert_eq!(
        features & (wanted | protocol),
        wanted | protocol,
        "features {features:#x}"
    );
    assert_eq!(features & (1 << 22), 0, "no MQ");
    frontend.set_features(wanted | protocol).unwrap();
    let protocol_features = frontend.get_protocol_features().unwrap();
    assert!(protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK));
    assert!(!protocol_features.contains(VhostUserProtocolFeatures::MQ));
    assert!(!protocol_features.contains(VhostUserProtocolFeatures::CONFIG));
    frontend.set_protocol_features(protocol_features).unwrap();
    // Every later message waits for the backend's ack, so the rings are
    // set up and enabled before the test kicks them (a kick that beats
    // SET_VRING_ENABLE is dropped by vhost-user-backend).
    frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);

    let region = mem.iter().next().unwrap();
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: hva(0),
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();

    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut tx = DriverQueue::new(&mem, rx.end(), 16, 0x1000);
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let calls: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    for (index, queue) in [&rx, &tx].into_iter().enumerate() {
        let (desc, avail, used) = queue.ring_addresses();
        frontend.set_vring_num(index, queue.size()).unwrap();
        frontend
            .set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: queue.size(),
                    queue_size: queue.size(),
                    flags: 0,
                    desc_table_addr: hva(desc),
                    used_ring_addr: hva(used),
                    avail_ring_addr: hva(avail),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(index, 0).unwrap();
        frontend.set_vring_call(index, &calls[index]).unwrap();
        frontend.set_vring_kick(index, &kicks[index]).unwrap();
        frontend.set_vring_enable(index, true).unwrap();
    }
    // SET_FEATURES reached the model: the TAP takes what the guest acked.
    assert_eq!(
        tap.last_offloads(),
        Some(TapOffloads {
            csum: true,
            tso4: true,
            tso6: false,
        })
    );

    for _ in 0..4 {
        rx.add_chain(&mem, &[(0x1000, true, &[])]).unwrap();
    }
    kicks[0].write(1).unwrap();
    let inbound = frame(200, 60);
    host.send(&vnet_header(0, 0), &inbound);
    let (_, len, data) = wait_for("an rx frame from the backend", || rx.pop_used(&mem));
    assert_eq!(len as usize, VNET_HDR_LEN + 200);
    assert_eq!(num_buffers(&data), 1);
    assert_eq!(&data[VNET_HDR_LEN..], &inbound[..]);
    wait_for("the rx call eventfd", || calls[0].read().ok());

    let outbound = frame(90, 70);
    let mut wire = vnet_header(0, 0).to_vec();
    wire.extend_from_slice(&outbound);
    tx.add_chain(&mem, &[(wire.len() as u32, false, &wire)])
        .unwrap();
    kicks[1].write(1).unwrap();
    let record = host.recv(WAIT).unwrap_or_else(|| {
        panic!(
            "no tx frame from the backend; stats {:?}, tx used {:?}",
            server.stats(),
            tx.pop_used(&mem)
        )
    });
    assert_eq!(&record[VNET_HDR_LEN..], &outbound[..]);

    // Counted just after the frame moved: the test may see the frame first.
    wait_for("both frames counted", || {
        let stats = server.stats();
        ((stats.rx_packets, stats.tx_packets) == (1, 1)).then_some(())
    });
    let start = Instant::now();
    server.stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "stop with a live frontend took {:?}",
        start.elapsed()
    );
    assert!(!socket.exists(), "stop removes the socket");
}

/// QEMU's virtio-net takes `rx_queue_size`/`tx_queue_size` up to 1024; a
/// backend refusing SET_VRING_NUM would drop the session.
#[test]
fn vhost_user_backend_accepts_vrings_of_1024_and_serves_a_second_frontend() {
    use vhost::vhost_user::message::VhostUserVirtioFeatures;
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    let dir = temp_dir();
    let socket = dir.path().join("net.sock");
    let (tap, _host) = fake_tap(TapOffloads::NONE);
    let server = super::vhost_user::serve_frame_device(&socket, tap, NetConfig::new(MAC)).unwrap();
    for _ in 0..2 {
        let frontend = Frontend::connect(&socket, 2).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_eq!(
            features & (CSUM | GUEST_CSUM),
            0,
            "no offload over a TAP without any"
        );
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        frontend
            .set_features(features & (VIRTIO_F_VERSION_1 | protocol))
            .unwrap();
        for index in 0..2 {
            frontend.set_vring_num(index, 1024).unwrap();
        }
        assert_eq!(
            frontend.get_features().unwrap(),
            features,
            "the backend keeps the session after SET_VRING_NUM 1024"
        );
        drop(frontend);
    }
    assert!(
        !server.is_finished(),
        "the server waits for the next frontend"
    );
    server.stop();
}

/// Sends one raw vhost-user message (header and body) on `stream`.
fn send_raw_vhost_user(
    stream: &mut std::os::unix::net::UnixStream,
    request: u32,
    flags: u32,
    body: &[u8],
) {
    use std::io::Write;
    let mut message = Vec::new();
    message.extend_from_slice(&request.to_le_bytes());
    message.extend_from_slice(&flags.to_le_bytes());
    message.extend_from_slice(&(body.len() as u32).to_le_bytes());
    message.extend_from_slice(body);
    stream.write_all(&message).unwrap();
}

#[test]
fn vhost_user_session_survives_a_vring_enable_sent_before_the_features_as_qemu_sends_it() {
    use std::io::Read;
    const GET_FEATURES: u32 = 1;
    const SET_OWNER: u32 = 3;
    const SET_VRING_ENABLE: u32 = 18;
    const VERSION_1: u32 = 0x1;
    const NEED_REPLY: u32 = 0x8;
    let dir = temp_dir();
    let socket = dir.path().join("net.sock");
    let (tap, _host) = fake_tap(ALL_OFFLOADS);
    let server =
        super::vhost_user::serve_frame_device(&socket, tap.clone(), NetConfig::new(MAC)).unwrap();

    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    send_raw_vhost_user(&mut stream, SET_OWNER, VERSION_1, &[]);
    // Queue 0, enabled: what QEMU's virtio-net sends when the guest writes
    // its features, before SET_FEATURES.
    let mut enable = Vec::new();
    enable.extend_from_slice(&0u32.to_le_bytes());
    enable.extend_from_slice(&1u32.to_le_bytes());
    send_raw_vhost_user(
        &mut stream,
        SET_VRING_ENABLE,
        VERSION_1 | NEED_REPLY,
        &enable,
    );
    let mut ack = [0u8; 20];
    stream
        .read_exact(&mut ack)
        .expect("the early enable is acked");
    assert_eq!(
        u32::from_le_bytes(ack[0..4].try_into().unwrap()),
        SET_VRING_ENABLE
    );
    assert_eq!(
        u64::from_le_bytes(ack[12..20].try_into().unwrap()),
        0,
        "success"
    );

    send_raw_vhost_user(&mut stream, GET_FEATURES, VERSION_1, &[]);
    let mut reply = [0u8; 20];
    stream
        .read_exact(&mut reply)
        .expect("the session is still alive: the daemon answers GET_FEATURES");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        GET_FEATURES
    );
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_ne!(
        features & (1 << 30),
        0,
        "PROTOCOL_FEATURES offered: {features:#x}"
    );
    drop(stream);
    drop(server);
    assert!(!socket.exists(), "the server removed its socket");
    assert!(
        !dir.path().join("net.sock.backend").exists(),
        "the server removed the daemon's socket"
    );
}

#[test]
fn stop_ends_a_relayed_session_whose_frontend_stopped_reading_its_replies() {
    const GET_FEATURES: u32 = 1;
    const VERSION_1: u32 = 0x1;
    let dir = temp_dir();
    let socket = dir.path().join("net.sock");
    let (tap, _host) = fake_tap(ALL_OFFLOADS);
    let server =
        super::vhost_user::serve_frame_device(&socket, tap.clone(), NetConfig::new(MAC)).unwrap();
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    // A hostile frontend: asks for replies and never reads them, until its
    // own sends block (the relay and the daemon have stopped reading too).
    stream.set_nonblocking(true).unwrap();
    let mut request = Vec::new();
    request.extend_from_slice(&GET_FEATURES.to_le_bytes());
    request.extend_from_slice(&VERSION_1.to_le_bytes());
    request.extend_from_slice(&0u32.to_le_bytes());
    let started = Instant::now();
    let mut sent = 0usize;
    let mut blocked_since = None;
    while started.elapsed() < WAIT {
        match std::io::Write::write(&mut &stream, &request) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                // Blocked for a while: every buffer on the way is full.
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("the relay hung up on a frontend it should still serve: {error}"),
        }
    }
    assert!(
        blocked_since.is_some(),
        "the frontend's sends never blocked ({sent} bytes sent)"
    );
    let (done, stopped) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || {
        server.stop();
        done.send(()).unwrap();
    });
    stopped
        .recv_timeout(WAIT)
        .expect("stop returns while the frontend still holds its connection unread");
    stopper.join().unwrap();
    drop(stream);
    assert!(!socket.exists(), "the server removed its socket");
}
