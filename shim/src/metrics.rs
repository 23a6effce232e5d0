//! The agent's container statistics as containerd's cgroup v1 `Metrics`
//! (`io.containerd.cgroups.v1.Metrics`), which `ctr task metrics` and the
//! CRI plugin decode.

use containerd_shim_protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim_protos::protobuf::MessageField;
use husk_agent_client::agent::StatsContainerResponse;

/// Converts the guest's figures.
pub fn cgroup_v1_metrics(stats: &StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: cpu.usage_total_ns,
                user: cpu.usage_user_ns,
                kernel: cpu.usage_system_ns,
                ..Default::default()
            }),
            throttling: MessageField::some(Throttle {
                throttled_periods: cpu.throttled_periods,
                throttled_time: cpu.throttled_time_ns,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(memory) = stats.memory.as_ref() {
        metrics.memory = MessageField::some(MemoryStat {
            cache: memory.cache_bytes,
            rss: memory.rss_bytes,
            usage: MessageField::some(MemoryEntry {
                usage: memory.usage_bytes,
                limit: memory.limit_bytes,
                max: memory.max_usage_bytes,
                failcnt: memory.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if let Some(io) = stats.io.as_ref() {
        let entry = |op: &str, value| BlkIOEntry {
            op: op.to_owned(),
            value,
            ..Default::default()
        };
        metrics.blkio = MessageField::some(BlkIOStat {
            io_service_bytes_recursive: vec![
                entry("Read", io.read_bytes),
                entry("Write", io.write_bytes),
            ],
            ..Default::default()
        });
    }
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::{Message, MessageDyn};
    use husk_agent_client::agent::{CpuStats, MemoryStats};

    #[test]
    fn figures_land_in_the_v1_fields_containerd_reads() {
        let mut stats = StatsContainerResponse::new();
        stats.cpu = MessageField::some(CpuStats {
            usage_total_ns: 5_000,
            ..Default::default()
        });
        stats.memory = MessageField::some(MemoryStats {
            usage_bytes: 4096,
            limit_bytes: 1 << 30,
            ..Default::default()
        });
        let metrics = cgroup_v1_metrics(&stats);
        assert_eq!(metrics.cpu.usage.total, 5_000);
        assert_eq!(metrics.memory.usage.usage, 4096);
        assert_eq!(metrics.memory.usage.limit, 1 << 30);
        assert_eq!(
            metrics.descriptor_dyn().full_name(),
            "io.containerd.cgroups.v1.Metrics"
        );
        let bytes = metrics.write_to_bytes().unwrap();
        assert_eq!(Metrics::parse_from_bytes(&bytes).unwrap(), metrics);
    }
}
