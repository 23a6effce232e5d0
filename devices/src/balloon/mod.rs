//! virtio-balloon (virtio 1.2, section 5.5) for free page reporting only.
//!
//! The balloon is never inflated: `num_pages` stays 0, so the device never
//! asks the guest for memory. What it is for is VIRTIO_BALLOON_F_REPORTING
//! (5.5.6.7): the guest's page allocator hands the host blocks of memory it
//! has just freed, and the device releases their host backing, so a pod's
//! VM costs the host what its guest uses now rather than the most it ever
//! touched. The guest gets the pages back on its next access (zero-filled
//! for anonymous memory, from the punched file for memfd memory) without
//! telling the device anything.
//!
//! The device offers VIRTIO_F_VERSION_1 (added by the transport) and
//! REPORTING, nothing else: no statistics queue, no free page hinting, no
//! DEFLATE_ON_OOM, no PAGE_POISON. Without STATS_VQ and FREE_PAGE_HINT the
//! queues are numbered inflateq 0, deflateq 1, reporting_vq 2 (5.5.2: a
//! queue that does not exist takes no index). A guest kernel that poisons
//! or zeroes freed pages (`page_poison=1`, `init_on_free=1`) needs
//! PAGE_POISON for reporting, and Linux drops REPORTING when it is not
//! offered: such a guest keeps its memory.
//!
//! The inflate and deflate queues exist because every balloon driver sets
//! them up. Their buffers are returned unused, and pages put on the inflate
//! queue are *not* discarded: the device never asked for them, Linux only
//! inflates towards `num_pages`, and reporting already returns every free
//! page, so a second, unrequested way for the guest to discard its own
//! memory would add a code path without adding anything to reclaim.
//!
//! Everything in a reporting chain is guest input: each descriptor must be
//! device-writable and lie wholly inside one guest RAM region (not in an
//! MMIO hole, not across two regions); it is rounded inward to whole host
//! pages, never outward, and a chain is bounded by
//! [`MAX_REPORT_DESCRIPTORS`]. A descriptor that fails is skipped and
//! counted in [`BalloonStats`] (with at most one rate-limited line per chain
//! for refusals and one for failed releases, through the device's
//! [`GuestLog`](crate::guest_log::GuestLog)); the chain is returned with
//! used length 0 either way.
//!
//! There is no vhost-user adapter: the vhost-user protocol has no balloon
//! device, so under QEMU the guest gets QEMU's own `virtio-balloon-device`
//! with `free-page-reporting=on`, which does the same with QEMU's memory.
//!
//! | module | concern |
//! | --- | --- |
//! | `model` | features, the configuration space, the counters |
//! | `discard` | checking a reported range against guest RAM and releasing its host backing (`madvise` or `fallocate`) |
//! | `queues` | the three queues: reporting chains in, every chain back |
//! | `mmio` | [`BalloonDevice`], the [`VirtioDevice`](crate::VirtioDevice) adapter for virtio-mmio, and its worker thread |

mod discard;
mod mmio;
mod model;
mod queues;

#[cfg(test)]
mod tests;

pub use mmio::BalloonDevice;
pub use model::{BalloonStats, CONFIG_SPACE_LEN, VIRTIO_BALLOON_F_REPORTING};

/// The virtio device id of a memory balloon (virtio 1.2, section 5).
pub const VIRTIO_ID_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// Index of `inflateq` (virtio 1.2, 5.5.2).
pub const INFLATE_QUEUE_INDEX: usize = 0;
/// Index of `deflateq` (virtio 1.2, 5.5.2).
pub const DEFLATE_QUEUE_INDEX: usize = 1;
/// Index of `reporting_vq`: 4 in the spec's full list, 2 here because
/// neither `statsq` (STATS_VQ) nor `free_page_vq` (FREE_PAGE_HINT) exists
/// (virtio 1.2, 5.5.2).
pub const REPORTING_QUEUE_INDEX: usize = 2;
/// Queues the device declares; a driver that did not negotiate REPORTING
/// sets up the first two only.
pub const NUM_QUEUES: usize = 3;
/// Size of each queue. Linux refuses a reporting queue smaller than its
/// `PAGE_REPORTING_CAPACITY` (32 ranges per report); 128 is QEMU's size
/// for every balloon queue.
pub const QUEUE_SIZE: u16 = 128;
/// Most descriptors of one reporting chain the device acts on; the rest
/// are skipped and counted. Linux reports at most `PAGE_REPORTING_CAPACITY`
/// (32) ranges per chain, each a free block of at least a pageblock (2 MiB
/// on x86_64).
pub const MAX_REPORT_DESCRIPTORS: usize = 32;
/// Chains taken from one queue per pass of the worker before it looks for
/// a stop request again; a guest that keeps a queue full cannot keep the
/// device from stopping.
pub const CHAINS_PER_PASS: usize = 64;
/// The host page: x86_64's base page, the only architecture husk builds
/// for. Reported ranges are rounded inward to it.
pub const HOST_PAGE_SIZE: u64 = 4096;

/// Errors of the balloon device and its worker.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The guest's queues could not be read or written.
    #[error("virtio-balloon queue {queue} access failed: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// An epoll instance or eventfd could not be created or used.
    #[error("virtio-balloon worker: event plumbing failed ({what}): {source}")]
    Event {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot spawn the virtio-balloon thread {name}: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
}
