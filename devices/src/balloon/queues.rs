//! The balloon's queues, on a plain `virtio_queue::Queue` and the guest's
//! `GuestMemoryMmap`, independent of what wakes the device.
//!
//! [`BalloonQueues::pump`] takes what the driver made available on each
//! queue, up to [`CHAINS_PER_PASS`] chains per queue:
//!
//! * `inflateq` and `deflateq`: each chain is returned with used length 0
//!   and counted; its page numbers are not read (see the module
//!   documentation of `balloon` for why inflated pages are not discarded);
//! * `reporting_vq`: each descriptor of a chain, up to
//!   [`MAX_REPORT_DESCRIPTORS`], is checked and released through
//!   [`discard`](super::discard); then the chain is returned with used
//!   length 0 (the device writes nothing into a report, virtio 1.2,
//!   5.5.6.7).
//!
//! A refused descriptor or a failed release is counted; a chain with any
//! makes at most one line (each kind), through the device's rate-limited
//! [`GuestLog`], never one per descriptor.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::discard::{self, DiscardError, RangeRefused};
use super::model::{count, Counters};
use super::{
    BalloonError, CHAINS_PER_PASS, DEFLATE_QUEUE_INDEX, INFLATE_QUEUE_INDEX,
    MAX_REPORT_DESCRIPTORS, REPORTING_QUEUE_INDEX,
};
use crate::guest_log::{guest_warn, GuestLog};
use crate::virtio::rearm_and_recheck;

/// What one pass over the queues did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PumpOutcome {
    /// Some queue has used buffers the driver asked to be told about.
    pub notify: bool,
    /// Some queue stopped at [`CHAINS_PER_PASS`]: pump again.
    pub more: bool,
}

/// What one reporting chain came to.
#[derive(Debug, Default)]
struct ChainReport {
    ranges_discarded: u64,
    bytes_discarded: u64,
    refused: u64,
    first_refusal: Option<RangeRefused>,
    failures: u64,
    first_failure: Option<DiscardError>,
}

/// The balloon's queue handling, shared by every pass of one device.
pub struct BalloonQueues {
    counters: Arc<Counters>,
    guest_log: GuestLog,
}

impl BalloonQueues {
    pub fn new(counters: Arc<Counters>, guest_log: GuestLog) -> Self {
        Self {
            counters,
            guest_log,
        }
    }

    /// The device's log budget.
    pub fn guest_log(&self) -> &GuestLog {
        &self.guest_log
    }

    /// One pass over `queues`, in queue order (inflate, deflate, then
    /// reporting when the driver negotiated it).
    pub fn pump<'q>(
        &self,
        mem: &GuestMemoryMmap,
        queues: impl IntoIterator<Item = &'q mut Queue>,
    ) -> Result<PumpOutcome, BalloonError> {
        let mut outcome = PumpOutcome::default();
        for (index, queue) in queues.into_iter().enumerate() {
            let (notify, more) = match index {
                INFLATE_QUEUE_INDEX | DEFLATE_QUEUE_INDEX => {
                    self.drain(mem, queue, index, |_, _| {})?
                }
                REPORTING_QUEUE_INDEX => {
                    self.drain(mem, queue, index, |queues, chain| queues.report(mem, chain))?
                }
                // The device declares three queues; the transport hands
                // over no more than that.
                _ => (false, false),
            };
            outcome.notify |= notify;
            outcome.more |= more;
        }
        Ok(outcome)
    }

    /// Takes up to [`CHAINS_PER_PASS`] chains from `queue`, hands each to
    /// `handle` and returns it with used length 0. Returns whether the
    /// driver must be notified and whether chains are left.
    fn drain<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        queue: &mut Queue,
        index: usize,
        handle: impl Fn(&Self, DescriptorChain<&'m GuestMemoryMmap>),
    ) -> Result<(bool, bool), BalloonError> {
        let queue_error = |source| BalloonError::Queue {
            queue: index,
            source,
        };
        let mut used_any = false;
        let mut budget = CHAINS_PER_PASS;
        let mut more = false;
        loop {
            queue.disable_notification(mem).map_err(queue_error)?;
            loop {
                if budget == 0 {
                    more = true;
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                if index == REPORTING_QUEUE_INDEX {
                    count(&self.counters.reports, 1);
                } else {
                    count(&self.counters.unrequested_chains, 1);
                }
                handle(self, chain);
                queue.add_used(mem, head, 0).map_err(queue_error)?;
                used_any = true;
            }
            // Re-check after enabling notifications (virtio 1.2, 2.7.10).
            if more || !rearm_and_recheck(queue, mem).map_err(queue_error)? {
                break;
            }
        }
        let notify = used_any && queue.needs_notification(mem).map_err(queue_error)?;
        Ok((notify, more))
    }

    /// Releases what one reporting chain names, counts it, and logs (on
    /// the budget) what went wrong.
    fn report(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let head = chain.head_index();
        let report = report_chain(mem, chain);
        count(&self.counters.ranges_discarded, report.ranges_discarded);
        count(&self.counters.bytes_discarded, report.bytes_discarded);
        count(&self.counters.ranges_refused, report.refused);
        count(&self.counters.discard_failures, report.failures);
        if let Some(first) = report.first_refusal {
            guest_warn!(
                self.guest_log,
                head,
                refused = report.refused,
                first = %first,
                "virtio-balloon skipped reported ranges"
            );
        }
        if let Some(first) = report.first_failure {
            guest_warn!(
                self.guest_log,
                head,
                failed = report.failures,
                first = %first,
                "virtio-balloon could not release reported ranges"
            );
        }
    }
}

/// Checks and releases each descriptor of a reporting chain.
fn report_chain(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> ChainReport {
    let head = chain.head_index();
    let mut report = ChainReport::default();
    let refuse = |report: &mut ChainReport, why: RangeRefused| {
        report.refused += 1;
        report.first_refusal.get_or_insert(why);
    };
    for (position, desc) in chain.enumerate() {
        let (addr, len) = (desc.addr(), u64::from(desc.len()));
        if position >= MAX_REPORT_DESCRIPTORS {
            // The rest is not walked: an indirect table may hold 65,535.
            refuse(&mut report, RangeRefused::TooManyDescriptors { head });
            break;
        }
        if !desc.is_write_only() {
            refuse(
                &mut report,
                RangeRefused::DeviceReadable { addr: addr.0, len },
            );
            continue;
        }
        if len == 0 {
            // Names no memory: nothing to release, nothing wrong.
            continue;
        }
        let range = match discard::check_range(mem, addr, len) {
            Ok(range) => range,
            Err(why) => {
                refuse(&mut report, why);
                continue;
            }
        };
        match range.release() {
            Ok(()) => {
                report.ranges_discarded += 1;
                report.bytes_discarded += range.len();
            }
            Err(error) => {
                report.failures += 1;
                report.first_failure.get_or_insert(error);
            }
        }
    }
    report
}
