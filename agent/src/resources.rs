//! Container resources in the guest: whether a requested limit can be met,
//! cgroup statistics in the API's shape, and OOM-kill detection.
//!
//! OOM kills are read from the cgroup's own counter (`oom_kill` in
//! `memory.events` on cgroup v2, `memory.oom_control` on v1) whenever one
//! of the container's processes the agent follows (its init or an exec)
//! exits, so an OOM kill that ends such a process is reported just before
//! its exit. On cgroup v2 the agent also follows `memory.events` with
//! inotify (the kernel signals a change of that file), so a kill of any
//! other process in the container (a child of its shell) is reported when
//! it happens, without polling. Each kill is reported once, whichever path
//! sees it first.
//!
//! IO figures are the bytes the container's cgroup moved to and from block
//! devices: `rbytes`/`wbytes` of `io.stat` on cgroup v2, the `Read`/`Write`
//! lines of blkio's `io_service_bytes` on v1, summed over devices. A guest
//! whose files all live on virtio-fs or tmpfs has no block device, so the
//! kernel accounts no block IO and both figures are honestly zero there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use husk_protocols::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse};
use husk_runtime::Container;
use oci_spec::runtime::LinuxResources;
use serde_json::Value;
use tokio::io::unix::AsyncFd;

use crate::error::{AgentError, Result};
use crate::guest;

/// Whether the guest can give what `resources` asks for: CPUs and memory
/// nodes that exist, and no more memory than the guest has.
pub fn check_satisfiable(resources: &LinuxResources) -> Result<()> {
    if let Some(cpus) = resources.cpu().as_ref().and_then(|c| c.cpus().clone()) {
        let online = guest::online_cpus();
        for cpu in parse_cpu_list(&cpus).map_err(AgentError::InvalidRequest)? {
            if !online.contains(&cpu) {
                return Err(AgentError::Unsatisfiable {
                    what: format!("cpuset {cpus:?}"),
                    why: format!("CPU {cpu} is not online (online: {online:?})"),
                });
            }
        }
    }
    if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
        let total = guest::memory_total_bytes();
        if limit > 0 && total > 0 && limit as u64 > total {
            return Err(AgentError::Unsatisfiable {
                what: format!("memory limit {limit} bytes"),
                why: format!("the guest has {total} bytes"),
            });
        }
    }
    Ok(())
}

/// Parses a cpuset list such as `0-2,4`.
pub fn parse_cpu_list(list: &str) -> std::result::Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid CPU list {list:?}");
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (
                    first.parse().map_err(|_| bad())?,
                    last.parse().map_err(|_| bad())?,
                );
                if last < first || last - first > 4096 {
                    return Err(bad());
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}

fn number(value: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The container's statistics.
pub fn stats(container: &Container) -> StatsContainerResponse {
    let raw = container.stats();
    let oom_kills = oom_kill_count(container).unwrap_or(0);
    StatsContainerResponse {
        cpu: protobuf::MessageField::some(CpuStats {
            usage_total_ns: number(&raw, &["cpu", "usage", "total"]),
            usage_user_ns: number(&raw, &["cpu", "usage", "user"]),
            usage_system_ns: number(&raw, &["cpu", "usage", "kernel"]),
            throttled_periods: number(&raw, &["cpu", "throttling", "throttledPeriods"]),
            throttled_time_ns: number(&raw, &["cpu", "throttling", "throttledTime"]),
            ..Default::default()
        }),
        memory: protobuf::MessageField::some(MemoryStats {
            usage_bytes: number(&raw, &["memory", "usage", "usage"]),
            limit_bytes: number(&raw, &["memory", "usage", "limit"]),
            max_usage_bytes: number(&raw, &["memory", "usage", "max"]),
            cache_bytes: number(&raw, &["memory", "cache"]),
            rss_bytes: number(&raw, &["memory", "rss"]),
            oom_kills,
            ..Default::default()
        }),
        pids: protobuf::MessageField::some(PidsStats {
            current: number(&raw, &["pids", "current"]),
            limit: number(&raw, &["pids", "limit"]),
            ..Default::default()
        }),
        io: protobuf::MessageField::some(io_stats(&container.record().cgroups)),
        ..Default::default()
    }
}

/// Block IO bytes read and written, summed over devices.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoBytes {
    pub read: u64,
    pub write: u64,
}

impl std::ops::AddAssign for IoBytes {
    fn add_assign(&mut self, other: Self) {
        self.read = self.read.saturating_add(other.read);
        self.write = self.write.saturating_add(other.write);
    }
}

/// Sums `rbytes=` and `wbytes=` over the device lines of a cgroup v2
/// `io.stat` (`MAJ:MIN rbytes=N wbytes=N rios=N ...`). Empty text (no
/// block device did IO for the cgroup) is zero.
pub fn parse_io_stat(text: &str) -> IoBytes {
    let mut total = IoBytes::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next().is_none() {
            continue;
        }
        let mut device = IoBytes::default();
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "rbytes" => device.read = value,
                "wbytes" => device.write = value,
                _ => {}
            }
        }
        total += device;
    }
    total
}

/// Sums the `Read` and `Write` lines of a cgroup v1 blkio
/// `*io_service_bytes*` file (`MAJ:MIN Read N`, ..., `MAJ:MIN Total N`,
/// and a final `Total N`).
pub fn parse_blkio_service_bytes(text: &str) -> IoBytes {
    let mut total = IoBytes::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [device, op, value] = words.as_slice() else {
            continue;
        };
        if !device.contains(':') {
            continue;
        }
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match *op {
            "Read" => total.read = total.read.saturating_add(value),
            "Write" => total.write = total.write.saturating_add(value),
            _ => {}
        }
    }
    total
}

/// The v1 blkio files that count bytes, best first: the throttle layer
/// sees every bio whatever the IO scheduler, and the recursive forms
/// include child cgroups.
const BLKIO_SERVICE_BYTES: [&str; 4] = [
    "blkio.throttle.io_service_bytes_recursive",
    "blkio.throttle.io_service_bytes",
    "blkio.io_service_bytes_recursive",
    "blkio.io_service_bytes",
];

/// The container's block IO bytes from whichever hierarchy it has; zero
/// where the kernel keeps no such figure.
pub fn io_bytes(cgroups: &husk_runtime::cgroups::CgroupPaths) -> IoBytes {
    if cgroups.unified_only {
        return cgroups
            .dir_for("io")
            .and_then(|dir| std::fs::read_to_string(dir.join("io.stat")).ok())
            .map(|text| parse_io_stat(&text))
            .unwrap_or_default();
    }
    let Some(dir) = cgroups.dir_for("blkio") else {
        return IoBytes::default();
    };
    BLKIO_SERVICE_BYTES
        .iter()
        .find_map(|file| std::fs::read_to_string(dir.join(file)).ok())
        .map(|text| parse_blkio_service_bytes(&text))
        .unwrap_or_default()
}

fn io_stats(cgroups: &husk_runtime::cgroups::CgroupPaths) -> IoStats {
    let bytes = io_bytes(cgroups);
    IoStats {
        read_bytes: bytes.read,
        write_bytes: bytes.write,
        ..Default::default()
    }
}

fn memory_dir(container: &Container) -> Option<PathBuf> {
    container
        .record()
        .cgroups
        .dir_for("memory")
        .map(std::path::Path::to_path_buf)
}

fn oom_kill_count(container: &Container) -> Option<u64> {
    read_oom_kills(&memory_dir(container)?)
}

fn read_oom_kills(dir: &Path) -> Option<u64> {
    ["memory.events", "memory.oom_control"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(dir.join(file)).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .next()
}

/// Detects OOM kills in a container's cgroup: each [`OomWatch::report_new_kills`]
/// reports the kills since the previous call (or since creation).
pub struct OomWatch {
    dir: Option<PathBuf>,
    seen: Mutex<u64>,
}

impl OomWatch {
    pub fn new(container: &Container) -> Self {
        Self::in_dir(memory_dir(container))
    }

    fn in_dir(dir: Option<PathBuf>) -> Self {
        let seen = dir.as_deref().and_then(read_oom_kills).unwrap_or(0);
        Self {
            dir,
            seen: Mutex::new(seen),
        }
    }

    /// Calls `report` with the number of OOM kills the cgroup counted since
    /// the last call, if any. `report` runs under the watch's lock, so two
    /// callers cannot report one kill twice or out of order.
    pub fn report_new_kills(&self, report: impl FnOnce(u64)) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(count) = self.dir.as_deref().and_then(read_oom_kills) else {
            return;
        };
        let new = count.saturating_sub(*seen);
        *seen = count.max(*seen);
        if new > 0 {
            report(new);
        }
    }

    #[cfg(test)]
    fn new_kills(&self) -> u64 {
        let mut kills = 0;
        self.report_new_kills(|new| kills = new);
        kills
    }

    /// On cgroup v2, a task that calls `report_new_kills(report)` each time
    /// the kernel signals a change of `memory.events`, until the cgroup is
    /// removed or the task aborted. `None` where there is no such file
    /// (cgroup v1: kills are then seen when a followed process exits).
    pub fn follow<F>(self: &Arc<Self>, report: F) -> Option<tokio::task::JoinHandle<()>>
    where
        F: Fn(u64) + Send + Sync + 'static,
    {
        let events = self.dir.as_deref()?.join("memory.events");
        if !events.exists() {
            return None;
        }
        let inotify = match inotify_on(&events) {
            Ok(inotify) => inotify,
            Err(error) => {
                tracing::warn!(path = %events.display(), %error, "cannot follow OOM kills with inotify");
                return None;
            }
        };
        let watch = self.clone();
        Some(tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            loop {
                let read = inotify
                    .async_io(tokio::io::Interest::READABLE, |fd| {
                        // SAFETY: reads into a live buffer of the given length.
                        let n = unsafe {
                            libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len())
                        };
                        if n < 0 {
                            Err(std::io::Error::last_os_error())
                        } else {
                            Ok(n as usize)
                        }
                    })
                    .await;
                let n = match read {
                    Ok(n) => n,
                    Err(error) => {
                        tracing::debug!(%error, "OOM follower ended");
                        return;
                    }
                };
                watch.report_new_kills(&report);
                if inotify_events_end_the_watch(&buffer[..n]) {
                    return;
                }
            }
        }))
    }
}

/// A non-blocking inotify instance watching `path` for modifications.
fn inotify_on(path: &Path) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: inotify_init1 takes only flags.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid inotify fd and a NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the AsyncFd owns `fd` and deregisters it before closing it;
    // no other registration of this descriptor exists.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Whether a batch of `inotify_event`s says the watch is gone (the file,
/// so the cgroup, was removed).
fn inotify_events_end_the_watch(mut events: &[u8]) -> bool {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    while events.len() >= HEADER {
        let mask = u32::from_ne_bytes([events[4], events[5], events[6], events[7]]);
        let name_len = u32::from_ne_bytes([events[12], events[13], events[14], events[15]]);
        if mask & libc::IN_IGNORED != 0 {
            return true;
        }
        events = events.get(HEADER + name_len as usize..).unwrap_or_default();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_expand_ranges_and_reject_garbage() {
        assert_eq!(parse_cpu_list("0-2,4").unwrap(), vec![0, 1, 2, 4]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn io_stat_sums_read_and_write_bytes_over_devices() {
        let text = "254:0 rbytes=1459200 wbytes=8388608 rios=192 wios=353 dbytes=0 dios=0\n\
                    254:16 rbytes=4096 wbytes=512 rios=1 wios=1 dbytes=0 dios=0\n";
        assert_eq!(
            parse_io_stat(text),
            IoBytes {
                read: 1_463_296,
                write: 8_389_120
            }
        );
        // No block device did IO for the cgroup: the kernel writes nothing.
        assert_eq!(parse_io_stat(""), IoBytes::default());
        // Unknown keys (io.cost, newer kernels) and junk are skipped.
        assert_eq!(
            parse_io_stat("8:0 rbytes=10 wbytes=x cost.usage=5 junk\n8:1\n"),
            IoBytes { read: 10, write: 0 }
        );
    }

    #[test]
    fn blkio_service_bytes_sums_read_and_write_lines_not_totals() {
        let text = "254:0 Read 4096\n254:0 Write 8388608\n254:0 Sync 8388608\n\
                    254:0 Async 4096\n254:0 Discard 0\n254:0 Total 8392704\n\
                    8:0 Read 100\n8:0 Write 0\n8:0 Total 100\nTotal 8392804\n";
        assert_eq!(
            parse_blkio_service_bytes(text),
            IoBytes {
                read: 4196,
                write: 8_388_608
            }
        );
        assert_eq!(parse_blkio_service_bytes("Total 0\n"), IoBytes::default());
    }

    #[test]
    fn the_oom_watch_reports_each_kill_once() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let watch = OomWatch::in_dir(Some(dir.path().to_path_buf()));
        assert_eq!(watch.new_kills(), 0, "kills before the watch began");
        std::fs::write(&events, "low 0\nhigh 0\nmax 9\noom 3\noom_kill 3\n").unwrap();
        assert_eq!(watch.new_kills(), 2);
        assert_eq!(watch.new_kills(), 0);
        // cgroup v1 reports the counter in memory.oom_control.
        let v1 = tempfile::tempdir().unwrap();
        let control = v1.path().join("memory.oom_control");
        std::fs::write(&control, "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").unwrap();
        let watch = OomWatch::in_dir(Some(v1.path().to_path_buf()));
        std::fs::write(&control, "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n").unwrap();
        assert_eq!(watch.new_kills(), 1);
        assert_eq!(OomWatch::in_dir(None).new_kills(), 0);
    }

    #[tokio::test]
    async fn the_follower_reports_a_kill_when_memory_events_changes() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "oom 0\noom_kill 0\n").unwrap();
        let watch = Arc::new(OomWatch::in_dir(Some(dir.path().to_path_buf())));
        let (sender, mut kills) = tokio::sync::mpsc::unbounded_channel();
        let follower = watch
            .follow(move |new| {
                let _ = sender.send(new);
            })
            .expect("memory.events exists");
        std::fs::write(&events, "oom 1\noom_kill 1\n").unwrap();
        assert_eq!(kills.recv().await, Some(1));
        // Removing the file ends the watch and the task.
        std::fs::remove_file(&events).unwrap();
        follower.await.unwrap();
        // The exit path finds nothing new: the kill was reported once.
        assert_eq!(watch.new_kills(), 0);
    }

    #[test]
    fn an_ignored_event_ends_the_watch() {
        let event = |mask: u32, name_len: u32| {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&1i32.to_ne_bytes());
            bytes.extend_from_slice(&mask.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            bytes.extend_from_slice(&name_len.to_ne_bytes());
            bytes.extend(std::iter::repeat_n(0, name_len as usize));
            bytes
        };
        let mut batch = event(libc::IN_MODIFY, 16);
        assert!(!inotify_events_end_the_watch(&batch));
        batch.extend(event(libc::IN_IGNORED, 0));
        assert!(inotify_events_end_the_watch(&batch));
    }

    #[test]
    fn asking_for_cpus_the_guest_lacks_is_unsatisfiable() {
        let resources: LinuxResources =
            serde_json::from_str(r#"{"cpu":{"cpus":"0-4095"}}"#).unwrap();
        assert!(matches!(
            check_satisfiable(&resources),
            Err(AgentError::Unsatisfiable { .. })
        ));
    }
}
