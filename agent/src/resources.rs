//! Container resources in the guest: whether a requested limit can be met,
//! cgroup statistics in the API's shape, and OOM-kill detection.
//!
//! OOM kills are read from the cgroup's own counter (`oom_kill` in
//! `memory.events` on cgroup v2, `memory.oom_control` on v1) whenever one
//! of the container's processes the agent follows (its init or an exec)
//! exits, so no polling is needed: an OOM kill that ends such a process is
//! reported just before its exit.
//!
//! IO figures are the bytes the container's cgroup moved to and from block
//! devices: `rbytes`/`wbytes` of `io.stat` on cgroup v2, the `Read`/`Write`
//! lines of blkio's `io_service_bytes` on v1, summed over devices. A guest
//! whose files all live on virtio-fs or tmpfs has no block device, so the
//! kernel accounts no block IO and both figures are honestly zero there.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use husk_protocols::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse};
use husk_runtime::Container;
use oci_spec::runtime::LinuxResources;
use serde_json::Value;

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

/// Detects OOM kills in a container's cgroup: each [`OomWatch::new_kills`]
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

    /// How many OOM kills the cgroup counted since the last call.
    pub fn new_kills(&self) -> u64 {
        let Some(count) = self.dir.as_deref().and_then(read_oom_kills) else {
            return 0;
        };
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = count.saturating_sub(*seen);
        *seen = count.max(*seen);
        new
    }
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
