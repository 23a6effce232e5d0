//! Unit tests of the balloon: feature negotiation and the configuration
//! space, reported ranges released (and read back as zeros) in anonymous,
//! shared and memfd-backed guest memory, every kind of hostile descriptor
//! refused without a byte outside the reported pages changing, the inflate
//! and deflate queues, and the MMIO adapter's worker end to end. The guest
//! is the test-support crate's [`DriverQueue`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_test_support::virtqueue::DriverQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::model::{ConfigSpace, ConfigWriteRefused, Counters};
use super::queues::BalloonQueues;
use super::{
    BalloonDevice, BalloonStats, HOST_PAGE_SIZE, MAX_REPORT_DESCRIPTORS, NUM_QUEUES, QUEUE_SIZE,
    VIRTIO_BALLOON_F_REPORTING, VIRTIO_ID_BALLOON,
};
use crate::guest_log::{Clock, GuestLog, GUEST_LOG_BURST, GUEST_LOG_INTERVAL};
use crate::{ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const MIB: u64 = 1 << 20;
const PAGE: u64 = HOST_PAGE_SIZE;
/// Guest RAM of most tests: two adjacent regions (A below 8 MiB, B up to
/// 12 MiB), a hole where a VMM would map MMIO, and region C beyond it.
const REGION_A: (u64, u64) = (0, 8 * MIB);
const REGION_B: (u64, u64) = (8 * MIB, 4 * MIB);
const HOLE: u64 = 12 * MIB;
const REGION_C: (u64, u64) = (16 * MIB, 4 * MIB);
/// Where reported pages live in region A (the queues sit below 1 MiB).
const REPORTED: u64 = 4 * MIB;
/// Descriptors per test queue: more than a report may use, so a chain can
/// exceed the limit.
const DRIVER_QUEUE_SIZE: u16 = 64;
const WAIT: Duration = Duration::from_secs(5);

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1 as usize),
        (GuestAddress(REGION_B.0), REGION_B.1 as usize),
        (GuestAddress(REGION_C.0), REGION_C.1 as usize),
    ])
    .unwrap()
}

/// The byte the tests' pattern puts at `addr`: never 0.
fn pattern_byte(addr: u64) -> u8 {
    (addr % 251) as u8 + 1
}

/// Fills `[addr, addr + len)` with the pattern.
fn fill(mem: &GuestMemoryMmap, addr: u64, len: u64) {
    let bytes: Vec<u8> = (addr..addr + len).map(pattern_byte).collect();
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len as usize];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// Asserts `[addr, addr + len)` still holds the pattern.
fn assert_pattern(mem: &GuestMemoryMmap, addr: u64, len: u64, what: &str) {
    let bytes = read(mem, addr, len);
    if let Some(at) = (0..len).find(|&i| bytes[i as usize] != pattern_byte(addr + i)) {
        panic!("{what}: byte {:#x} changed", addr + at);
    }
}

/// Asserts `[addr, addr + len)` reads as zeros.
fn assert_zeros(mem: &GuestMemoryMmap, addr: u64, len: u64, what: &str) {
    let bytes = read(mem, addr, len);
    if let Some(at) = bytes.iter().position(|&b| b != 0) {
        panic!("{what}: byte {:#x} is not zero", addr + at as u64);
    }
}

/// The queues of a driver that negotiated REPORTING, over `mem`, driven on
/// the test's thread.
struct Harness {
    mem: GuestMemoryMmap,
    drivers: Vec<DriverQueue>,
    queues: Vec<Queue>,
    handler: BalloonQueues,
    counters: Arc<Counters>,
}

impl Harness {
    fn new(mem: GuestMemoryMmap) -> Self {
        Self::with_guest_log(mem, GuestLog::new())
    }

    fn with_guest_log(mem: GuestMemoryMmap, guest_log: GuestLog) -> Self {
        let mut drivers = Vec::new();
        let mut base = 0x1000;
        for _ in 0..NUM_QUEUES {
            let driver = DriverQueue::new(&mem, base, DRIVER_QUEUE_SIZE, 0x100);
            base = driver.end().next_multiple_of(PAGE);
            drivers.push(driver);
        }
        assert!(base < MIB, "the rings stay below the reported pages");
        let queues = drivers.iter().map(DriverQueue::device_queue).collect();
        let counters = Arc::new(Counters::default());
        let handler = BalloonQueues::new(counters.clone(), guest_log);
        Self {
            mem,
            drivers,
            queues,
            handler,
            counters,
        }
    }

    /// Posts one reporting chain of (address, length, device-writable).
    fn report(&mut self, ranges: &[(u64, u32, bool)]) -> u16 {
        self.drivers[super::REPORTING_QUEUE_INDEX]
            .add_chain_at(&self.mem, ranges)
            .expect("room in the reporting queue")
    }

    /// One pass; returns whether the driver is to be notified.
    fn pump(&mut self) -> bool {
        let outcome = self
            .handler
            .pump(&self.mem, self.queues.iter_mut())
            .unwrap();
        assert!(!outcome.more, "a test never posts a pass's worth");
        outcome.notify
    }

    /// Every used entry of queue `index`: (head, used length).
    fn used(&mut self, index: usize) -> Vec<(u16, u32)> {
        let mut used = Vec::new();
        while let Some((head, len, _)) = self.drivers[index].pop_used(&self.mem) {
            used.push((head, len));
        }
        used
    }

    fn stats(&self) -> BalloonStats {
        self.counters.snapshot()
    }
}

/// Whether the host page at `addr` of `mem` is resident (mincore).
fn resident(mem: &GuestMemoryMmap, addr: u64) -> bool {
    let host = vm_memory::GuestMemory::get_host_address(mem, GuestAddress(addr)).unwrap();
    let mut vector = 0u8;
    // SAFETY: a page-aligned page of a live mapping, one byte of output.
    let ret = unsafe { libc::mincore(host.cast(), PAGE as usize, &mut vector) };
    assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
    vector & 1 != 0
}

// ---- features and configuration space ---------------------------------------

#[test]
fn the_device_is_a_balloon_offering_reporting_alone_on_three_queues() {
    let device = BalloonDevice::new();
    assert_eq!(device.device_type(), 5);
    assert_eq!(VIRTIO_ID_BALLOON, 5);
    assert_eq!(device.available_features(), 1 << 5, "REPORTING only");
    for absent in [0, 1, 2, 3, 4] {
        // MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT, PAGE_POISON
        assert_eq!(
            device.available_features() & (1 << absent),
            0,
            "bit {absent}"
        );
    }
    assert_eq!(device.queue_max_sizes(), vec![QUEUE_SIZE; 3]);
    assert!(
        QUEUE_SIZE as usize >= MAX_REPORT_DESCRIPTORS,
        "Linux needs 32 slots"
    );
    assert_eq!(device.actual_pages(), 0);
}

#[test]
fn config_space_holds_num_pages_zero_and_the_actual_the_driver_writes() {
    let mut device = BalloonDevice::new();
    let mut space = [0xaau8; 12];
    device.read_config(0, &mut space);
    assert_eq!(space, [0; 12], "num_pages 0, actual 0, nothing beyond");

    device.write_config(4, &0x0102_0304u32.to_le_bytes());
    let mut actual = [0u8; 4];
    device.read_config(4, &mut actual);
    assert_eq!(u32::from_le_bytes(actual), 0x0102_0304, "little-endian");
    assert_eq!(device.actual_pages(), 0x0102_0304);
    device.write_config(6, &[0xff]);
    assert_eq!(device.actual_pages(), 0x01ff_0304, "byte-wide writes land");

    let mut num_pages = [0xaau8; 4];
    device.write_config(0, &7u32.to_le_bytes());
    device.read_config(0, &mut num_pages);
    assert_eq!(num_pages, [0; 4], "num_pages is the device's");

    let mut config = ConfigSpace::default();
    assert_eq!(
        config.write(6, &[1, 2, 3, 4]),
        Err(ConfigWriteRefused { offset: 6, len: 4 }),
        "a write running past actual is refused whole"
    );
    assert_eq!(
        config.write(u64::MAX, &[1]),
        Err(ConfigWriteRefused {
            offset: u64::MAX,
            len: 1
        })
    );
    assert_eq!(config.actual, 0);

    device.reset();
    assert_eq!(device.actual_pages(), 0, "a reset clears actual");
}

// ---- reporting ---------------------------------------------------------------

#[test]
fn a_reported_range_is_released_and_reads_back_as_zeros() {
    let mut h = Harness::new(memory());
    fill(&h.mem, REPORTED, 16 * PAGE);
    assert!(resident(&h.mem, REPORTED + 4 * PAGE));
    let head = h.report(&[(REPORTED + 4 * PAGE, 8 * PAGE as u32, true)]);
    assert!(h.pump(), "the driver is notified");
    assert_eq!(
        h.used(super::REPORTING_QUEUE_INDEX),
        vec![(head, 0)],
        "returned, length 0"
    );
    // Before anything reads it (a read maps the zero page back in).
    assert!(
        !resident(&h.mem, REPORTED + 4 * PAGE),
        "the page went back to the host"
    );
    assert_zeros(&h.mem, REPORTED + 4 * PAGE, 8 * PAGE, "the reported pages");
    assert_pattern(&h.mem, REPORTED, 4 * PAGE, "the pages below");
    assert_pattern(&h.mem, REPORTED + 12 * PAGE, 4 * PAGE, "the pages above");
    assert_eq!(
        h.stats(),
        BalloonStats {
            reports: 1,
            ranges_discarded: 1,
            bytes_discarded: 8 * PAGE,
            ..BalloonStats::default()
        }
    );
    // The guest uses the pages again: they are ordinary memory.
    fill(&h.mem, REPORTED + 4 * PAGE, PAGE);
    assert_pattern(&h.mem, REPORTED + 4 * PAGE, PAGE, "a reused page");
}

#[test]
fn a_chain_of_several_ranges_releases_each() {
    let mut h = Harness::new(memory());
    fill(&h.mem, REPORTED, 8 * PAGE);
    fill(&h.mem, REGION_C.0, 4 * PAGE);
    h.report(&[
        (REPORTED, PAGE as u32, true),
        (REPORTED + 2 * PAGE, 2 * PAGE as u32, true),
        (REGION_C.0 + PAGE, PAGE as u32, true),
    ]);
    h.pump();
    assert_zeros(&h.mem, REPORTED, PAGE, "range 1");
    assert_pattern(&h.mem, REPORTED + PAGE, PAGE, "the page between");
    assert_zeros(&h.mem, REPORTED + 2 * PAGE, 2 * PAGE, "range 2");
    assert_zeros(&h.mem, REGION_C.0 + PAGE, PAGE, "range 3, another region");
    assert_pattern(&h.mem, REGION_C.0, PAGE, "region C's first page");
    let stats = h.stats();
    assert_eq!(
        (stats.ranges_discarded, stats.bytes_discarded),
        (3, 4 * PAGE)
    );
}

#[test]
fn an_unaligned_range_is_rounded_inward_and_its_partial_pages_are_kept() {
    let mut h = Harness::new(memory());
    fill(&h.mem, REPORTED, 5 * PAGE);
    // From 100 bytes into page 1 to 100 bytes into page 4.
    h.report(&[(REPORTED + PAGE + 100, 3 * PAGE as u32, true)]);
    h.pump();
    assert_pattern(&h.mem, REPORTED + PAGE, PAGE, "the partial first page");
    assert_zeros(
        &h.mem,
        REPORTED + 2 * PAGE,
        2 * PAGE,
        "the whole pages inside",
    );
    assert_pattern(&h.mem, REPORTED + 4 * PAGE, PAGE, "the partial last page");
    assert_eq!(h.stats().bytes_discarded, 2 * PAGE);
    assert_eq!(h.stats().ranges_refused, 0);
}

#[test]
fn hostile_ranges_are_refused_counted_and_touch_nothing() {
    let mut h = Harness::new(memory());
    let a_end = REGION_A.0 + REGION_A.1;
    let b_end = REGION_B.0 + REGION_B.1;
    // Everything around the boundaries the descriptors aim at.
    fill(&h.mem, a_end - 4 * PAGE, 8 * PAGE);
    fill(&h.mem, b_end - 4 * PAGE, 4 * PAGE);
    fill(&h.mem, REGION_C.0, 4 * PAGE);
    fill(&h.mem, REPORTED, 4 * PAGE);
    let head = h.report(&[
        // In the MMIO hole.
        (HOLE, PAGE as u32, true),
        // From region A across its end into adjacent region B.
        (a_end - 2 * PAGE, 4 * PAGE as u32, true),
        // From region B's end into the hole.
        (b_end - 2 * PAGE, 4 * PAGE as u32, true),
        // From the hole into region C.
        (REGION_C.0 - PAGE, 2 * PAGE as u32, true),
        // Wrapping around the address space.
        (u64::MAX - PAGE + 1, 2 * PAGE as u32, true),
        // No whole page inside.
        (REPORTED + 1, PAGE as u32, true),
        // Device-readable: not a report.
        (REPORTED + PAGE, PAGE as u32, false),
    ]);
    assert!(h.pump());
    assert_eq!(
        h.used(super::REPORTING_QUEUE_INDEX),
        vec![(head, 0)],
        "the chain is returned all the same"
    );
    assert_pattern(
        &h.mem,
        a_end - 4 * PAGE,
        8 * PAGE,
        "around the A/B boundary",
    );
    assert_pattern(&h.mem, b_end - 4 * PAGE, 4 * PAGE, "the end of region B");
    assert_pattern(&h.mem, REGION_C.0, 4 * PAGE, "the start of region C");
    assert_pattern(
        &h.mem,
        REPORTED,
        4 * PAGE,
        "the pages of the small and readable ranges",
    );
    assert_eq!(
        h.stats(),
        BalloonStats {
            reports: 1,
            ranges_refused: 7,
            ..BalloonStats::default()
        }
    );
}

#[test]
fn a_chain_longer_than_the_limit_is_acted_on_up_to_the_limit() {
    let mut h = Harness::new(memory());
    let count = MAX_REPORT_DESCRIPTORS + 8;
    fill(&h.mem, REPORTED, count as u64 * PAGE);
    let ranges: Vec<(u64, u32, bool)> = (0..count as u64)
        .map(|i| (REPORTED + i * PAGE, PAGE as u32, true))
        .collect();
    h.report(&ranges);
    h.pump();
    let limit = MAX_REPORT_DESCRIPTORS as u64;
    assert_zeros(&h.mem, REPORTED, limit * PAGE, "the first 32 ranges");
    assert_pattern(
        &h.mem,
        REPORTED + limit * PAGE,
        8 * PAGE,
        "the ranges past the limit",
    );
    let stats = h.stats();
    // The rest of the chain is not walked: one refusal names it.
    assert_eq!((stats.ranges_discarded, stats.ranges_refused), (limit, 1));
}

#[test]
fn zero_length_descriptors_are_ignored() {
    let mut h = Harness::new(memory());
    fill(&h.mem, REPORTED, PAGE);
    h.report(&[(REPORTED, 0, true), (HOLE, 0, true)]);
    h.pump();
    assert_pattern(&h.mem, REPORTED, PAGE, "the page at a zero-length range");
    assert_eq!(
        h.stats(),
        BalloonStats {
            reports: 1,
            ..BalloonStats::default()
        }
    );
}

#[test]
fn inflate_and_deflate_chains_come_back_unused_and_their_pages_stay() {
    let mut h = Harness::new(memory());
    fill(&h.mem, REPORTED, PAGE);
    // An inflate request naming the patterned page by its PFN, as a
    // balloon driver would (le32 page numbers, device-readable).
    let pfn = (REPORTED / PAGE) as u32;
    let pfn_at = REPORTED + 2 * PAGE;
    h.mem.write_obj(pfn, GuestAddress(pfn_at)).unwrap();
    let inflate = h.drivers[super::INFLATE_QUEUE_INDEX]
        .add_chain_at(&h.mem, &[(pfn_at, 4, false)])
        .unwrap();
    let deflate = h.drivers[super::DEFLATE_QUEUE_INDEX]
        .add_chain_at(&h.mem, &[(pfn_at, 4, false)])
        .unwrap();
    assert!(h.pump());
    assert_eq!(h.used(super::INFLATE_QUEUE_INDEX), vec![(inflate, 0)]);
    assert_eq!(h.used(super::DEFLATE_QUEUE_INDEX), vec![(deflate, 0)]);
    assert_pattern(&h.mem, REPORTED, PAGE, "an inflated page is not discarded");
    assert_eq!(
        h.stats(),
        BalloonStats {
            unrequested_chains: 2,
            ..BalloonStats::default()
        }
    );
}

/// A clock that never moves: every guest-log line falls in one window.
struct FrozenClock(Instant);

impl Clock for FrozenClock {
    fn now(&self) -> Instant {
        self.0
    }
}

#[test]
fn refusals_are_counted_each_and_logged_within_the_budget() {
    let guest_log = GuestLog::with_clock(
        GUEST_LOG_BURST,
        GUEST_LOG_INTERVAL,
        Box::new(FrozenClock(Instant::now())),
    );
    let mut h = Harness::with_guest_log(memory(), guest_log.clone());
    let chains = 50u64;
    for _ in 0..chains {
        h.report(&[(HOLE, PAGE as u32, true)]);
        h.report(&[(HOLE, PAGE as u32, true), (REPORTED + 1, 8, true)]);
        h.pump();
        h.used(super::REPORTING_QUEUE_INDEX);
    }
    assert_eq!(h.stats().ranges_refused, 3 * chains);
    assert_eq!(h.stats().reports, 2 * chains);
    assert_eq!(guest_log.written_total(), u64::from(GUEST_LOG_BURST));
    assert_eq!(
        guest_log.suppressed_total(),
        2 * chains - u64::from(GUEST_LOG_BURST),
        "one line per chain at most, never one per range"
    );
}

// ---- other backings ----------------------------------------------------------

fn memfd(name: &std::ffi::CStr, len: u64) -> std::fs::File {
    // SAFETY: a NUL-terminated name; the fd is owned below.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` was just created and nothing else owns it.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(len).unwrap();
    file
}

fn allocated_bytes(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().blocks() * 512
}

#[test]
fn memfd_backed_memory_gets_a_hole_punched_in_its_file() {
    // Guest RAM as QEMU's memory-backend-memfd makes it: a shared mapping
    // of a memfd, here at file offset 1 MiB.
    let file = memfd(c"husk-balloon-test", 9 * MIB);
    let probe = file.try_clone().unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        8 * MIB as usize,
        Some(FileOffset::new(file, MIB)),
    )])
    .unwrap();
    let mut h = Harness::new(mem);
    fill(&h.mem, REPORTED, 16 * PAGE);
    let before = allocated_bytes(&probe);
    h.report(&[(REPORTED + 4 * PAGE, 8 * PAGE as u32, true)]);
    h.pump();
    // Before anything reads the hole (a read fault on shmem allocates).
    assert_eq!(
        before - allocated_bytes(&probe),
        8 * PAGE,
        "the file gave back exactly the reported pages"
    );
    assert_zeros(&h.mem, REPORTED + 4 * PAGE, 8 * PAGE, "the reported pages");
    assert_pattern(&h.mem, REPORTED, 4 * PAGE, "the pages below");
    assert_pattern(&h.mem, REPORTED + 12 * PAGE, 4 * PAGE, "the pages above");
    // The hole is in the file itself, where another process (QEMU) sees
    // it: 1 MiB of file offset plus the guest address.
    let mut from_file = vec![0xaau8; PAGE as usize];
    let file_offset = MIB + REPORTED + 4 * PAGE;
    // SAFETY: a live buffer of the given length.
    let got = unsafe {
        libc::pread(
            probe.as_raw_fd(),
            from_file.as_mut_ptr().cast(),
            from_file.len(),
            file_offset as libc::off_t,
        )
    };
    assert_eq!(got, PAGE as isize);
    assert!(
        from_file.iter().all(|&b| b == 0),
        "the file reads zeros there"
    );
    assert_eq!(h.stats().discard_failures, 0);
}

#[test]
fn shared_anonymous_memory_is_removed_not_just_unmapped() {
    let region = MmapRegion::<()>::build(
        None,
        8 * MIB as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .unwrap();
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    let mut h = Harness::new(mem);
    fill(&h.mem, REPORTED, 4 * PAGE);
    h.report(&[(REPORTED + PAGE, 2 * PAGE as u32, true)]);
    h.pump();
    // MADV_DONTNEED would leave the shared pages in place and they would
    // read back with the pattern; MADV_REMOVE frees them.
    assert_zeros(&h.mem, REPORTED + PAGE, 2 * PAGE, "the reported pages");
    assert_pattern(&h.mem, REPORTED, PAGE, "the page below");
    assert_pattern(&h.mem, REPORTED + 3 * PAGE, PAGE, "the page above");
    assert_eq!(h.stats().ranges_discarded, 1);
}

// ---- the MMIO adapter --------------------------------------------------------

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

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Activated queues over `drivers`, and the notifier of each.
fn activated(drivers: &[DriverQueue]) -> (Vec<ActivatedQueue>, Vec<EventFd>) {
    let mut queues = Vec::new();
    let mut notifiers = Vec::new();
    for driver in drivers {
        let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        notifiers.push(notifier.try_clone().unwrap());
        queues.push(ActivatedQueue {
            queue: driver.device_queue(),
            notifier,
        });
    }
    (queues, notifiers)
}

#[test]
fn the_mmio_worker_releases_a_report_returns_the_chain_and_interrupts() {
    let mem = memory();
    let mut drivers: Vec<DriverQueue> = (0..NUM_QUEUES as u64)
        .map(|i| DriverQueue::new(&mem, 0x1000 + i * 0x4000, 16, 0x100))
        .collect();
    let (queues, notifiers) = activated(&drivers);
    let mut device = BalloonDevice::new();
    device.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING);
    let interrupt = Arc::new(CountingInterrupt::default());
    device
        .activate(mem.clone(), interrupt.clone(), queues)
        .unwrap();
    assert!(device.is_active());

    fill(&mem, REPORTED, 4 * PAGE);
    let head = drivers[super::REPORTING_QUEUE_INDEX]
        .add_chain_at(&mem, &[(REPORTED + PAGE, 2 * PAGE as u32, true)])
        .unwrap();
    notifiers[super::REPORTING_QUEUE_INDEX].write(1).unwrap();
    wait_for("the reporting chain to be used", || {
        drivers[super::REPORTING_QUEUE_INDEX].used_idx(&mem) == 1
    });
    wait_for("the interrupt", || {
        interrupt.used.load(Ordering::SeqCst) >= 1
    });
    assert_eq!(
        drivers[super::REPORTING_QUEUE_INDEX].pop_used(&mem),
        Some((head, 0, Vec::new()))
    );
    assert_zeros(&mem, REPORTED + PAGE, 2 * PAGE, "the reported pages");
    assert_pattern(&mem, REPORTED, PAGE, "the page below");
    assert_pattern(&mem, REPORTED + 3 * PAGE, PAGE, "the page above");
    assert_eq!(device.stats().bytes_discarded, 2 * PAGE);

    device.reset();
    assert!(!device.is_active(), "a reset stops the worker");
    assert_eq!(device.stats().reports, 1, "counters outlive the worker");
}

#[test]
fn the_mmio_device_wants_two_queues_without_reporting_and_three_with_it() {
    let mem = memory();
    let drivers: Vec<DriverQueue> = (0..NUM_QUEUES as u64)
        .map(|i| DriverQueue::new(&mem, 0x1000 + i * 0x4000, 16, 0x100))
        .collect();

    let mut device = BalloonDevice::new();
    device.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING);
    let (two, _) = activated(&drivers[..2]);
    let error = device
        .activate(mem.clone(), Arc::new(CountingInterrupt::default()), two)
        .unwrap_err();
    assert!(
        matches!(
            error,
            ActivateError::QueueCount {
                expected: 3,
                ready: 2
            }
        ),
        "{error}"
    );
    assert!(!device.is_active());

    device.reset();
    device.set_acked_features(VIRTIO_F_VERSION_1);
    let (three, _) = activated(&drivers);
    let error = device
        .activate(mem.clone(), Arc::new(CountingInterrupt::default()), three)
        .unwrap_err();
    assert!(
        matches!(
            error,
            ActivateError::QueueCount {
                expected: 2,
                ready: 3
            }
        ),
        "{error}"
    );
    let (two, _) = activated(&drivers[..2]);
    device
        .activate(mem, Arc::new(CountingInterrupt::default()), two)
        .unwrap();
    assert!(device.is_active(), "a driver without reporting still runs");
}
