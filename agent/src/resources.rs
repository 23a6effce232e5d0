//! Container resources in the guest: whether a requested limit can be met,
//! cgroup statistics in the API's shape, and OOM-kill detection.
//!
//! OOM kills are read from the cgroup's own counter (`oom_kill` in
//! `memory.events` on cgroup v2, `memory.oom_control` on v1) when the
//! container's init exits, so no polling is needed: an OOM kill that ends a
//! container is reported just before its exit.

use std::path::PathBuf;

use husk_protocols::agent::{CpuStats, MemoryStats, PidsStats, StatsContainerResponse};
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
        io: protobuf::MessageField::some(Default::default()),
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

fn read_oom_kills(dir: &std::path::Path) -> Option<u64> {
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

/// Detects OOM kills in a container between its creation and its end.
pub struct OomWatch {
    dir: Option<PathBuf>,
    baseline: u64,
}

impl OomWatch {
    pub fn new(container: &Container) -> Self {
        let dir = memory_dir(container);
        let baseline = dir.as_deref().and_then(read_oom_kills).unwrap_or(0);
        Self { dir, baseline }
    }

    /// Whether the OOM killer struck since the watch began.
    pub fn fired(&self) -> bool {
        self.dir
            .as_deref()
            .and_then(read_oom_kills)
            .is_some_and(|count| count > self.baseline)
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
    fn asking_for_cpus_the_guest_lacks_is_unsatisfiable() {
        let resources: LinuxResources =
            serde_json::from_str(r#"{"cpu":{"cpus":"0-4095"}}"#).unwrap();
        assert!(matches!(
            check_satisfiable(&resources),
            Err(AgentError::Unsatisfiable { .. })
        ));
    }
}
