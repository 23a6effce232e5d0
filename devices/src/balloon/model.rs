//! What the driver negotiates and reads: the balloon's feature bits, its
//! configuration space, and the counters of what the device did.
//!
//! The configuration space is `struct virtio_balloon_config` (virtio 1.2,
//! 5.5.4) up to `actual`: `le32 num_pages` (the device's target, always 0
//! here) and `le32 actual` (what the driver says it holds, written by the
//! driver). The fields after them belong to FREE_PAGE_HINT and PAGE_POISON,
//! which are not offered, and read as 0.

use std::sync::atomic::{AtomicU64, Ordering};

/// VIRTIO_BALLOON_F_REPORTING (virtio 1.2, 5.5.3; the spec's
/// VIRTIO_BALLOON_F_PAGE_REPORTING): the device has `reporting_vq`.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// What the device offers besides VIRTIO_F_VERSION_1, which the transport
/// adds.
pub const DEVICE_FEATURES: u64 = VIRTIO_BALLOON_F_REPORTING;
/// Bytes of the configuration space the device defines: `num_pages` and
/// `actual`.
pub const CONFIG_SPACE_LEN: usize = 8;
/// Offset of `actual`, the one field the driver writes.
const ACTUAL_OFFSET: usize = 4;
/// The device's target, in 4 KiB pages: the balloon is never inflated.
const NUM_PAGES: u32 = 0;

/// The configuration space's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    /// `actual` as the driver last wrote it (4 KiB pages it says it holds).
    pub actual: u32,
}

/// A driver write the configuration space does not take.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
#[error("driver wrote {len} bytes at offset {offset} of the virtio-balloon config space, outside `actual` (bytes 4 to 7)")]
pub struct ConfigWriteRefused {
    pub offset: u64,
    pub len: usize,
}

impl ConfigSpace {
    fn bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut space = [0u8; CONFIG_SPACE_LEN];
        space[..ACTUAL_OFFSET].copy_from_slice(&NUM_PAGES.to_le_bytes());
        space[ACTUAL_OFFSET..].copy_from_slice(&self.actual.to_le_bytes());
        space
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the fields read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let space = self.bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .ok()
                .and_then(|offset| offset.checked_add(i));
            *byte = at.and_then(|at| space.get(at)).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset`: any part of `actual` (little-endian),
    /// byte by byte as the driver's access width allows. A write that
    /// touches anything else (`num_pages` is the device's) changes nothing.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigWriteRefused> {
        let refused = ConfigWriteRefused {
            offset,
            len: data.len(),
        };
        let start = usize::try_from(offset).map_err(|_| refused)?;
        let end = start.checked_add(data.len()).ok_or(refused)?;
        if start < ACTUAL_OFFSET || end > CONFIG_SPACE_LEN {
            return Err(refused);
        }
        let mut actual = self.actual.to_le_bytes();
        actual[start - ACTUAL_OFFSET..end - ACTUAL_OFFSET].copy_from_slice(data);
        self.actual = u32::from_le_bytes(actual);
        Ok(())
    }
}

/// What the device has done since it was created; counters survive
/// resets, so a guest gains nothing by resetting the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Reporting chains returned to the guest.
    pub reports: u64,
    /// Reported ranges whose host backing was released.
    pub ranges_discarded: u64,
    /// Bytes released, after rounding each range inward to whole pages.
    pub bytes_discarded: u64,
    /// Reported descriptors skipped: device-readable, outside guest RAM,
    /// across two RAM regions, holding no whole page, or past
    /// [`MAX_REPORT_DESCRIPTORS`](super::MAX_REPORT_DESCRIPTORS).
    pub ranges_refused: u64,
    /// Ranges the host refused to release (`madvise` or `fallocate`
    /// failed); the guest keeps their memory.
    pub discard_failures: u64,
    /// Inflate and deflate chains, returned unused: the device never asks
    /// for pages.
    pub unrequested_chains: u64,
}

/// The device's counters, shared with every worker it runs (plain
/// atomics: only the worker writes them, anyone may read).
#[derive(Debug, Default)]
pub struct Counters {
    pub reports: AtomicU64,
    pub ranges_discarded: AtomicU64,
    pub bytes_discarded: AtomicU64,
    pub ranges_refused: AtomicU64,
    pub discard_failures: AtomicU64,
    pub unrequested_chains: AtomicU64,
}

impl Counters {
    /// The counts so far.
    pub fn snapshot(&self) -> BalloonStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BalloonStats {
            reports: load(&self.reports),
            ranges_discarded: load(&self.ranges_discarded),
            bytes_discarded: load(&self.bytes_discarded),
            ranges_refused: load(&self.ranges_refused),
            discard_failures: load(&self.discard_failures),
            unrequested_chains: load(&self.unrequested_chains),
        }
    }
}

/// Adds `n` to `counter`.
pub fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
