//! A container's resources as kubelet reads and changes them (issue #13):
//! `ContainerStats` reports the CPU time and memory a container used, and
//! `UpdateContainerResources` changes the limits the container's cgroup
//! enforces, as the container itself reads them.
//!
//! Each function runs under one handler and returns what a user observes,
//! so the tier can compare runc and husk. runc here uses the host's cgroup
//! v1 hierarchy and the guest uses cgroup v2, so the limits are read from
//! whichever files the container has and reported as numbers.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{ContainerState, LinuxContainerResources};

use super::Tier;

/// How long the statistics may take to show what the container did.
const STATS_TIMEOUT: Duration = Duration::from_secs(30);

/// What the container puts in its memory: a 32 MiB file on its tmpfs.
const FILLED_BYTES: u64 = 32 << 20;

/// A container that spends some CPU time and fills 32 MiB of tmpfs shows
/// both in `ContainerStats`, under its own id and name.
pub(super) fn container_stats(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod(handler, "stats")?;
    let container = tier.start_container(
        &pod,
        "worker",
        &[
            "sh",
            "-c",
            "head -c 33554432 /dev/zero > /dev/shm/fill; \
             i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
             touch /tmp/done; sleep 1000",
        ],
    )?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    let started = Instant::now();
    while tier
        .client
        .exec_sync(&container, &["test", "-e", "/tmp/done"])?
        .0
        != 0
    {
        ensure!(
            started.elapsed() < STATS_TIMEOUT,
            "the container did not finish its work within {STATS_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let stats = tier.client.container_stats(&container)?;
    let attributes = stats
        .attributes
        .context("ContainerStats has no attributes")?;
    ensure!(
        attributes.id == container,
        "ContainerStats names {}, not {container}",
        attributes.id
    );
    let name = attributes
        .metadata
        .map(|metadata| metadata.name)
        .unwrap_or_default();
    let cpu_ns = stats
        .cpu
        .and_then(|cpu| cpu.usage_core_nano_seconds)
        .map(|value| value.value)
        .context("ContainerStats has no CPU usage")?;
    let working_set = stats
        .memory
        .and_then(|memory| memory.working_set_bytes)
        .map(|value| value.value)
        .context("ContainerStats has no memory working set")?;
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    ensure!(cpu_ns > 0, "ContainerStats reports no CPU time");
    ensure!(
        working_set >= FILLED_BYTES,
        "ContainerStats reports a working set of {working_set} bytes, below the {FILLED_BYTES} the container filled"
    );
    Ok(format!(
        "stats for {name}: CPU time > 0, working set ≥ 32 MiB"
    ))
}

/// The memory limit and CPU quota the container's own cgroup holds, read
/// from inside it: (bytes, "quota period").
fn limits_seen_inside(tier: &Tier, container: &str) -> Result<(String, String)> {
    let memory = tier.exec_out(
        container,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || \
             cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        ],
    )?;
    let cpu = tier.exec_out(
        container,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/cpu.max 2>/dev/null || \
             echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)",
        ],
    )?;
    Ok((memory.trim().to_owned(), cpu.trim().to_owned()))
}

fn resources(memory: i64, cpu_quota: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        memory_limit_in_bytes: memory,
        cpu_period: 100_000,
        cpu_quota,
        cpu_shares: 512,
        ..Default::default()
    }
}

/// A container created with 128 MiB and half a CPU sees those limits in
/// its cgroup; after `UpdateContainerResources` to 96 MiB and a quarter
/// CPU it sees the new ones, and keeps running.
pub(super) fn update_container_resources(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod(handler, "update")?;
    let container = tier.start_container_with(&pod, "limited", &["sleep", "1000"], |config| {
        if let Some(linux) = config.linux.as_mut() {
            linux.resources = Some(resources(128 << 20, 50_000));
        }
    })?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    let (memory_before, cpu_before) = limits_seen_inside(tier, &container)?;
    tier.client
        .update_container_resources(&container, resources(96 << 20, 25_000))?;
    let (memory_after, cpu_after) = limits_seen_inside(tier, &container)?;
    let still = tier.exec_out(&container, &["echo", "alive"])?;
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    ensure!(
        (memory_before.as_str(), cpu_before.as_str()) == ("134217728", "50000 100000"),
        "created with 128 MiB and 50000/100000, the container sees {memory_before} and {cpu_before}"
    );
    ensure!(
        (memory_after.as_str(), cpu_after.as_str()) == ("100663296", "25000 100000"),
        "updated to 96 MiB and 25000/100000, the container sees {memory_after} and {cpu_after}"
    );
    Ok(format!(
        "memory {memory_before} → {memory_after}, cpu {cpu_before} → {cpu_after}, {}",
        still.trim()
    ))
}
