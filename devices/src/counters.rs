//! Process-wide device counters for the shim's `/metrics`: vsock
//! connections and bytes, virtio-fs requests and their failures, and the
//! guest-triggered log lines written or suppressed. One shim process runs
//! one pod, so the process is the pod. Each count is one relaxed atomic
//! add on a path that already does a system call or a queue walk; nothing
//! here logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Who opened a vsock stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Host,
    Guest,
}

/// The counters; read them with [`snapshot`].
#[derive(Debug, Default)]
pub struct DeviceCounters {
    vsock_opened_host: AtomicU64,
    vsock_opened_guest: AtomicU64,
    vsock_refused_host: AtomicU64,
    vsock_refused_guest: AtomicU64,
    vsock_bytes_to_guest: AtomicU64,
    vsock_bytes_from_guest: AtomicU64,
    fs_requests: AtomicU64,
    fs_request_errors: AtomicU64,
    guest_log_written: AtomicU64,
    guest_log_suppressed: AtomicU64,
}

/// The counters of this process.
pub static COUNTERS: DeviceCounters = DeviceCounters {
    vsock_opened_host: AtomicU64::new(0),
    vsock_opened_guest: AtomicU64::new(0),
    vsock_refused_host: AtomicU64::new(0),
    vsock_refused_guest: AtomicU64::new(0),
    vsock_bytes_to_guest: AtomicU64::new(0),
    vsock_bytes_from_guest: AtomicU64::new(0),
    fs_requests: AtomicU64::new(0),
    fs_request_errors: AtomicU64::new(0),
    guest_log_written: AtomicU64::new(0),
    guest_log_suppressed: AtomicU64::new(0),
};

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A vsock stream was established.
pub fn vsock_opened(by: Initiator) {
    add(
        match by {
            Initiator::Host => &COUNTERS.vsock_opened_host,
            Initiator::Guest => &COUNTERS.vsock_opened_guest,
        },
        1,
    );
}

/// A vsock stream was refused at the device's connection limit.
pub fn vsock_refused(by: Initiator) {
    add(
        match by {
            Initiator::Host => &COUNTERS.vsock_refused_host,
            Initiator::Guest => &COUNTERS.vsock_refused_guest,
        },
        1,
    );
}

/// Stream bytes the device moved to the guest.
pub fn vsock_bytes_to_guest(n: usize) {
    add(&COUNTERS.vsock_bytes_to_guest, n as u64);
}

/// Stream bytes the guest sent that the device accepted.
pub fn vsock_bytes_from_guest(n: usize) {
    add(&COUNTERS.vsock_bytes_from_guest, n as u64);
}

/// A FUSE request reached the virtio-fs device; `failed` when it got no
/// reply from the server or was refused before it.
pub fn fs_request(failed: bool) {
    add(&COUNTERS.fs_requests, 1);
    if failed {
        add(&COUNTERS.fs_request_errors, 1);
    }
}

/// A guest-triggered log line was written (`true`) or suppressed.
pub fn guest_log_line(written: bool) {
    add(
        if written {
            &COUNTERS.guest_log_written
        } else {
            &COUNTERS.guest_log_suppressed
        },
        1,
    );
}

/// The counters' values at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub vsock_opened_host: u64,
    pub vsock_opened_guest: u64,
    pub vsock_refused_host: u64,
    pub vsock_refused_guest: u64,
    pub vsock_bytes_to_guest: u64,
    pub vsock_bytes_from_guest: u64,
    pub fs_requests: u64,
    pub fs_request_errors: u64,
    pub guest_log_written: u64,
    pub guest_log_suppressed: u64,
}

/// Reads every counter.
pub fn snapshot() -> CountersSnapshot {
    let c = &COUNTERS;
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    CountersSnapshot {
        vsock_opened_host: get(&c.vsock_opened_host),
        vsock_opened_guest: get(&c.vsock_opened_guest),
        vsock_refused_host: get(&c.vsock_refused_host),
        vsock_refused_guest: get(&c.vsock_refused_guest),
        vsock_bytes_to_guest: get(&c.vsock_bytes_to_guest),
        vsock_bytes_from_guest: get(&c.vsock_bytes_from_guest),
        fs_requests: get(&c.fs_requests),
        fs_request_errors: get(&c.fs_request_errors),
        guest_log_written: get(&c.guest_log_written),
        guest_log_suppressed: get(&c.guest_log_suppressed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_moves_its_own_counter() {
        // Other tests of this process count too: compare differences.
        let before = snapshot();
        vsock_opened(Initiator::Guest);
        vsock_refused(Initiator::Host);
        vsock_bytes_to_guest(10);
        vsock_bytes_from_guest(7);
        fs_request(true);
        fs_request(false);
        guest_log_line(false);
        let after = snapshot();
        assert!(after.vsock_opened_guest > before.vsock_opened_guest);
        assert!(after.vsock_refused_host > before.vsock_refused_host);
        assert!(after.vsock_bytes_to_guest >= before.vsock_bytes_to_guest + 10);
        assert!(after.vsock_bytes_from_guest >= before.vsock_bytes_from_guest + 7);
        assert!(after.fs_requests >= before.fs_requests + 2);
        assert!(after.fs_request_errors > before.fs_request_errors);
        assert!(after.guest_log_suppressed > before.guest_log_suppressed);
    }
}
