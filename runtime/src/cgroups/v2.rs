//! cgroup v2: a single hierarchy. Controllers must be enabled in every
//! ancestor's `cgroup.subtree_control`; limits use the v2 file names and
//! units (cpu shares become `cpu.weight`). Device rules would need an eBPF
//! program and are not implemented here; the spec's `unified` map is
//! written verbatim.

use super::{read, write};
use crate::error::{Error, Result};
use oci_spec::runtime::LinuxResources;
use serde_json::json;
use std::path::Path;

/// How long `set_frozen` waits for `cgroup.events` to report frozen.
const FREEZE_TIMEOUT_MS: u64 = 2_000;

/// Enable every available controller in each ancestor of `leaf`.
pub fn enable_controllers(leaf: &Path) {
    let mut chain: Vec<&Path> = leaf
        .ancestors()
        .skip(1)
        .take_while(|p| p.join("cgroup.controllers").exists())
        .collect();
    chain.reverse();
    for dir in chain {
        if let Some(avail) = read(dir, "cgroup.controllers") {
            let enable: Vec<String> = avail.split_whitespace().map(|c| format!("+{c}")).collect();
            // Best effort: a controller can be busy (e.g. threaded mode).
            for c in enable {
                let _ = write(dir, "cgroup.subtree_control", &c);
            }
        }
    }
}

/// cgroup v1 `cpu.shares` (2..262144) to v2 `cpu.weight` (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + ((shares.saturating_sub(2)) * 9999) / 262_142
}

/// Writes `memory.swap.max`. A kernel without swap accounting has no such
/// file; as under runc, "no swap" (0) and "unlimited" (max) then need
/// nothing, and any other amount is an error naming the setting.
fn set_swap_max(dir: &Path, value: &str) -> Result<()> {
    if !dir.join("memory.swap.max").exists() {
        if value == "0" || value == "max" {
            return Ok(());
        }
        return Err(Error::spec(
            "linux.resources.memory.swap",
            format!(
                "asks for {value} bytes of swap beyond the memory limit, but this kernel has no swap accounting (no memory.swap.max in {})",
                dir.display()
            ),
        ));
    }
    write(dir, "memory.swap.max", value)
}

/// Write every limit of `resources` into `dir`.
pub fn apply(dir: &Path, resources: &LinuxResources) -> Result<()> {
    if let Some(mem) = resources.memory() {
        if let Some(l) = mem.limit() {
            write(
                dir,
                "memory.max",
                &if l < 0 {
                    "max".to_string()
                } else {
                    l.to_string()
                },
            )?;
        }
        if let Some(r) = mem.reservation() {
            write(dir, "memory.low", &r.to_string())?;
        }
        if let (Some(s), Some(l)) = (mem.swap(), mem.limit()) {
            let v = if s < 0 {
                "max".to_string()
            } else {
                (s - l).max(0).to_string()
            };
            set_swap_max(dir, &v)?;
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(s) = cpu.shares() {
            write(dir, "cpu.weight", &shares_to_weight(s).to_string())?;
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = cpu.period().unwrap_or(100_000);
            write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(c) = cpu.cpus().as_ref().filter(|c| !c.is_empty()) {
            write(dir, "cpuset.cpus", c)?;
        }
        if let Some(m) = cpu.mems().as_ref().filter(|m| !m.is_empty()) {
            write(dir, "cpuset.mems", m)?;
        }
    }
    if let Some(pids) = resources.pids() {
        let v = if pids.limit() > 0 {
            pids.limit().to_string()
        } else {
            "max".into()
        };
        write(dir, "pids.max", &v)?;
    }
    if let Some(bio) = resources.block_io() {
        if let Some(w) = bio.weight() {
            write(dir, "io.weight", &format!("default {w}"))?;
        }
        let throttles = [
            ("rbps", bio.throttle_read_bps_device()),
            ("wbps", bio.throttle_write_bps_device()),
            ("riops", bio.throttle_read_iops_device()),
            ("wiops", bio.throttle_write_iops_device()),
        ];
        for (key, list) in throttles {
            for t in list.iter().flatten() {
                write(
                    dir,
                    "io.max",
                    &format!("{}:{} {key}={}", t.major(), t.minor(), t.rate()),
                )?;
            }
        }
    }
    for l in resources.hugepage_limits().iter().flatten() {
        write(
            dir,
            &format!("hugetlb.{}.max", l.page_size()),
            &l.limit().to_string(),
        )?;
    }
    for (key, value) in resources.unified().iter().flatten() {
        if key.contains('/') {
            return Err(Error::spec(
                "linux.resources.unified",
                format!("{key} is not a cgroup file name"),
            ));
        }
        write(dir, key, value)?;
    }
    Ok(())
}

/// Freeze or thaw through `cgroup.freeze`, waiting for `cgroup.events`.
pub fn set_frozen(dir: &Path, frozen: bool) -> Result<()> {
    write(dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(FREEZE_TIMEOUT_MS);
    while std::time::Instant::now() < deadline {
        if read(dir, "cgroup.events").is_some_and(|e| e.lines().any(|l| l == want)) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(Error::Cgroup {
        path: dir.join("cgroup.events"),
        message: format!("did not reach {want}"),
    })
}

fn num(dir: &Path, file: &str) -> u64 {
    read(dir, file).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    read(dir, file)
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Statistics in the shape of runc's `events --stats` data.
pub fn stats(dir: &Path) -> serde_json::Value {
    json!({
        "cpu": {
            "usage": {
                "total": keyed(dir, "cpu.stat", "usage_usec ") * 1000,
                "kernel": keyed(dir, "cpu.stat", "system_usec ") * 1000,
                "user": keyed(dir, "cpu.stat", "user_usec ") * 1000,
            },
            "throttling": {}
        },
        "memory": {
            "usage": {
                "limit": read(dir, "memory.max").and_then(|v| v.parse::<u64>().ok()).unwrap_or(u64::MAX),
                "usage": num(dir, "memory.current"),
            },
        },
        "pids": { "current": num(dir, "pids.current"), "limit": read(dir, "pids.max").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) },
        "blkio": {},
        "hugetlb": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn v2_limits_land_in_v2_files_with_v2_units() {
        let dir = tempfile::tempdir().unwrap();
        let r = resources(
            r#"{"memory":{"limit":1048576,"reservation":524288,"swap":2097152},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1","mems":"0"},
                "pids":{"limit":0},
                "blockIO":{"weight":300,"throttleReadBpsDevice":[{"major":8,"minor":0,"rate":1000}]},
                "hugepageLimits":[{"pageSize":"2MB","limit":4194304}],
                "unified":{"memory.high":"900000"}}"#,
        );
        // A kernel with swap accounting has the file.
        std::fs::write(dir.path().join("memory.swap.max"), "max").unwrap();
        apply(dir.path(), &r).unwrap();
        let f = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(f("memory.max"), "1048576");
        assert_eq!(f("memory.low"), "524288");
        assert_eq!(f("memory.swap.max"), "1048576");
        assert_eq!(f("cpu.weight"), "39");
        assert_eq!(f("cpu.max"), "50000 100000");
        assert_eq!(f("cpuset.cpus"), "0-1");
        assert_eq!(f("pids.max"), "max");
        assert_eq!(f("io.weight"), "default 300");
        assert_eq!(f("io.max"), "8:0 rbps=1000");
        assert_eq!(f("hugetlb.2MB.max"), "4194304");
        assert_eq!(f("memory.high"), "900000");
    }

    #[test]
    fn without_swap_accounting_no_swap_needs_nothing_and_some_swap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // CRI's usual ask: swap equal to the limit, that is no swap.
        apply(
            dir.path(),
            &resources(r#"{"memory":{"limit":1048576,"swap":1048576}}"#),
        )
        .unwrap();
        assert!(!dir.path().join("memory.swap.max").exists());
        apply(
            dir.path(),
            &resources(r#"{"memory":{"limit":1048576,"swap":-1}}"#),
        )
        .unwrap();
        let error = apply(
            dir.path(),
            &resources(r#"{"memory":{"limit":1048576,"swap":2097152}}"#),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("linux.resources.memory.swap") && error.contains("1048576 bytes"),
            "{error}"
        );
    }

    #[test]
    fn unified_key_with_a_path_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let e = apply(dir.path(), &resources(r#"{"unified":{"../escape":"1"}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux.resources.unified"), "{e}");
    }

    #[test]
    fn cpu_shares_convert_to_weight_range() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }
}
