//! cgroup v1: one hierarchy per controller (or group of controllers), each
//! with its own files. Limits are written to the hierarchy that carries the
//! controller; device rules always end with runc's default allow list, so
//! a spec that denies everything still gets /dev/null, /dev/tty and ptys.

use super::{read, write, CgroupPaths};
use crate::error::{Error, Result};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources};
use serde_json::json;
use std::path::Path;

/// How long `set_frozen` waits for the freezer to settle.
const FREEZE_TIMEOUT_MS: u64 = 2_000;

/// Devices every container may use, whatever the spec says (runc's
/// `AllowedDevices`): `(type, major, minor, access)`, -1 meaning `*`.
const DEFAULT_ALLOWED_DEVICES: &[(char, i64, i64, &str)] = &[
    ('c', -1, -1, "m"),
    ('b', -1, -1, "m"),
    ('c', 1, 3, "rwm"),
    ('c', 1, 8, "rwm"),
    ('c', 1, 7, "rwm"),
    ('c', 5, 0, "rwm"),
    ('c', 1, 5, "rwm"),
    ('c', 1, 9, "rwm"),
    ('c', 136, -1, "rwm"),
    ('c', 5, 2, "rwm"),
    ('c', 10, 200, "rwm"),
];

/// A new cpuset cgroup is unusable until `cpuset.cpus`/`cpuset.mems` are
/// set; copy them down from the nearest ancestor that has them.
pub fn inherit_cpuset(leaf: &Path) -> Result<()> {
    let mut chain: Vec<&Path> = leaf
        .ancestors()
        .take_while(|p| p.join("cpuset.cpus").exists())
        .collect();
    chain.reverse();
    for pair in chain.windows(2) {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if read(pair[1], file).is_some_and(|v| v.is_empty()) {
                if let Some(v) = read(pair[0], file) {
                    write(pair[1], file, &v)?;
                }
            }
        }
    }
    Ok(())
}

fn device_rule(typ: char, major: i64, minor: i64, access: &str) -> String {
    let num = |n: i64| {
        if n < 0 {
            "*".to_string()
        } else {
            n.to_string()
        }
    };
    if typ == 'a' {
        format!("a *:* {access}")
    } else {
        format!("{typ} {}:{} {access}", num(major), num(minor))
    }
}

fn type_char(t: Option<LinuxDeviceType>) -> char {
    match t {
        Some(LinuxDeviceType::B) => 'b',
        Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => 'c',
        Some(LinuxDeviceType::P) => 'p',
        Some(LinuxDeviceType::A) | None => 'a',
    }
}

/// One device rule: (type, major, minor, access, allow); -1 is `*`.
type DeviceRule = (char, i64, i64, String, bool);

/// The rules to write, in runc's order: a leading deny-all (or allow-all)
/// first, then the allow rules of the spec and the defaults sorted by type,
/// major and minor (wildcards first) without duplicates, then any specific
/// deny rules. This yields the same `devices.list` as runc.
fn ordered_device_rules(rules: &[LinuxDeviceCgroup]) -> Vec<DeviceRule> {
    let mut all: Vec<DeviceRule> = rules
        .iter()
        .map(|r| {
            (
                type_char(r.typ()),
                r.major().unwrap_or(-1),
                r.minor().unwrap_or(-1),
                r.access().clone().unwrap_or_else(|| "rwm".into()),
                r.allow(),
            )
        })
        .collect();
    all.extend(
        DEFAULT_ALLOWED_DEVICES
            .iter()
            .map(|(t, maj, min, acc)| (*t, *maj, *min, acc.to_string(), true)),
    );
    let mut out = Vec::new();
    let mut rest = all.as_slice();
    // Leading blanket rules keep their place.
    while let Some((first, tail)) = rest.split_first() {
        if first.0 != 'a' {
            break;
        }
        out.push(first.clone());
        rest = tail;
    }
    let mut allows: Vec<DeviceRule> = rest.iter().filter(|r| r.4).cloned().collect();
    allows.sort_by_key(|r| (r.0, r.1, r.2));
    allows.dedup_by(|a, b| (a.0, a.1, a.2, &a.3) == (b.0, b.1, b.2, &b.3));
    out.extend(allows);
    out.extend(rest.iter().filter(|r| !r.4).cloned());
    out
}

fn apply_devices(dir: &Path, rules: &[LinuxDeviceCgroup]) -> Result<()> {
    for (t, maj, min, access, allow) in ordered_device_rules(rules) {
        let file = if allow {
            "devices.allow"
        } else {
            "devices.deny"
        };
        write(dir, file, &device_rule(t, maj, min, &access))?;
    }
    Ok(())
}

fn limit_value(v: i64) -> String {
    v.to_string()
}

/// Write every limit of `resources` to its hierarchy.
pub fn apply(paths: &CgroupPaths, resources: &LinuxResources) -> Result<()> {
    if let Some(dir) = paths.dir_for("devices") {
        apply_devices(dir, resources.devices().as_deref().unwrap_or(&[]))?;
    }
    if let (Some(mem), Some(dir)) = (resources.memory(), paths.dir_for("memory")) {
        if let Some(limit) = mem.limit() {
            let swap_file = dir.join("memory.memsw.limit_in_bytes");
            match (mem.swap(), swap_file.exists()) {
                (Some(swap), true) => {
                    // The kernel needs memsw >= limit at every step: raise
                    // memsw first when growing, the limit first when shrinking.
                    if write(dir, "memory.limit_in_bytes", &limit_value(limit)).is_err() {
                        write(dir, "memory.memsw.limit_in_bytes", &limit_value(swap))?;
                        write(dir, "memory.limit_in_bytes", &limit_value(limit))?;
                    } else {
                        write(dir, "memory.memsw.limit_in_bytes", &limit_value(swap))?;
                    }
                }
                _ => write(dir, "memory.limit_in_bytes", &limit_value(limit))?,
            }
        }
        if let Some(r) = mem.reservation() {
            write(dir, "memory.soft_limit_in_bytes", &limit_value(r))?;
        }
        if let Some(s) = mem.swappiness() {
            if s > 100 {
                return Err(Error::spec(
                    "linux.resources.memory.swappiness",
                    format!("{s} is above 100"),
                ));
            }
            write(dir, "memory.swappiness", &s.to_string())?;
        }
        if mem.disable_oom_killer() == Some(true) {
            write(dir, "memory.oom_control", "1")?;
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(dir) = paths.dir_for("cpu") {
            if let Some(s) = cpu.shares() {
                write(dir, "cpu.shares", &s.to_string())?;
            }
            if let Some(p) = cpu.period() {
                write(dir, "cpu.cfs_period_us", &p.to_string())?;
            }
            if let Some(q) = cpu.quota() {
                write(dir, "cpu.cfs_quota_us", &q.to_string())?;
            }
            if let Some(p) = cpu.realtime_period() {
                write(dir, "cpu.rt_period_us", &p.to_string())?;
            }
            if let Some(r) = cpu.realtime_runtime() {
                write(dir, "cpu.rt_runtime_us", &r.to_string())?;
            }
        }
        if let Some(dir) = paths.dir_for("cpuset") {
            if let Some(c) = cpu.cpus().as_ref().filter(|c| !c.is_empty()) {
                write(dir, "cpuset.cpus", c)?;
            }
            if let Some(m) = cpu.mems().as_ref().filter(|m| !m.is_empty()) {
                write(dir, "cpuset.mems", m)?;
            }
        }
    }
    if let (Some(pids), Some(dir)) = (resources.pids(), paths.dir_for("pids")) {
        let v = if pids.limit() > 0 {
            pids.limit().to_string()
        } else {
            "max".into()
        };
        write(dir, "pids.max", &v)?;
    }
    if let (Some(bio), Some(dir)) = (resources.block_io(), paths.dir_for("blkio")) {
        if let Some(w) = bio.weight() {
            let file = ["blkio.weight", "blkio.bfq.weight"]
                .into_iter()
                .find(|file| dir.join(file).exists())
                .ok_or_else(|| {
                    Error::spec(
                        "linux.resources.blockIO.weight",
                        format!(
                            "this kernel has neither blkio.weight nor blkio.bfq.weight in {} (no CFQ or BFQ I/O scheduler)",
                            dir.display()
                        ),
                    )
                })?;
            write(dir, file, &w.to_string())?;
        }
        if let Some(w) = bio.leaf_weight() {
            write(dir, "blkio.leaf_weight", &w.to_string())?;
        }
        for wd in bio.weight_device().iter().flatten() {
            if let Some(w) = wd.weight() {
                write(
                    dir,
                    "blkio.weight_device",
                    &format!("{}:{} {w}", wd.major(), wd.minor()),
                )?;
            }
        }
        let throttles = [
            (
                "blkio.throttle.read_bps_device",
                bio.throttle_read_bps_device(),
            ),
            (
                "blkio.throttle.write_bps_device",
                bio.throttle_write_bps_device(),
            ),
            (
                "blkio.throttle.read_iops_device",
                bio.throttle_read_iops_device(),
            ),
            (
                "blkio.throttle.write_iops_device",
                bio.throttle_write_iops_device(),
            ),
        ];
        for (file, list) in throttles {
            for t in list.iter().flatten() {
                write(
                    dir,
                    file,
                    &format!("{}:{} {}", t.major(), t.minor(), t.rate()),
                )?;
            }
        }
    }
    if let Some(limits) = resources.hugepage_limits() {
        if !limits.is_empty() {
            let dir = paths.dir_for("hugetlb").ok_or_else(|| {
                Error::spec(
                    "linux.resources.hugepageLimits",
                    "the hugetlb controller is not available on this host",
                )
            })?;
            for l in limits {
                write(
                    dir,
                    &format!("hugetlb.{}.limit_in_bytes", l.page_size()),
                    &l.limit().to_string(),
                )?;
            }
        }
    }
    if let Some(net) = resources.network() {
        if let (Some(id), Some(dir)) = (net.class_id(), paths.dir_for("net_cls")) {
            write(dir, "net_cls.classid", &id.to_string())?;
        }
        if let Some(dir) = paths.dir_for("net_prio") {
            for p in net.priorities().iter().flatten() {
                write(
                    dir,
                    "net_prio.ifpriomap",
                    &format!("{} {}", p.name(), p.priority()),
                )?;
            }
        }
    }
    if resources.unified().as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(Error::spec(
            "linux.resources.unified",
            "cgroup v2 settings on a cgroup v1 host",
        ));
    }
    Ok(())
}

/// Freeze or thaw through `freezer.state`, waiting until it settles.
pub fn set_frozen(dir: &Path, frozen: bool) -> Result<()> {
    let want = if frozen { "FROZEN" } else { "THAWED" };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(FREEZE_TIMEOUT_MS);
    loop {
        write(dir, "freezer.state", want)?;
        if read(dir, "freezer.state").as_deref() == Some(want) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Cgroup {
                path: dir.join("freezer.state"),
                message: format!("did not reach {want}"),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn num(dir: Option<&Path>, file: &str) -> u64 {
    dir.and_then(|d| read(d, file))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Statistics in the shape of runc's `events --stats` data.
pub fn stats(paths: &CgroupPaths) -> serde_json::Value {
    let mem = paths.dir_for("memory");
    let acct = paths.dir_for("cpuacct");
    let pids = paths.dir_for("pids");
    let percpu: Vec<u64> = acct
        .and_then(|d| read(d, "cpuacct.usage_percpu"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let pids_limit = pids
        .and_then(|d| read(d, "pids.max"))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    json!({
        "cpu": {
            "usage": {
                "total": num(acct, "cpuacct.usage"),
                "percpu": percpu,
                "kernel": num(acct, "cpuacct.usage_sys"),
                "user": num(acct, "cpuacct.usage_user"),
            },
            "throttling": {}
        },
        "memory": {
            "usage": {
                "limit": num(mem, "memory.limit_in_bytes"),
                "usage": num(mem, "memory.usage_in_bytes"),
                "max": num(mem, "memory.max_usage_in_bytes"),
                "failcnt": num(mem, "memory.failcnt"),
            },
            "swap": {
                "limit": num(mem, "memory.memsw.limit_in_bytes"),
                "usage": num(mem, "memory.memsw.usage_in_bytes"),
                "max": num(mem, "memory.memsw.max_usage_in_bytes"),
                "failcnt": num(mem, "memory.memsw.failcnt"),
            },
        },
        "pids": { "current": num(pids, "pids.current"), "limit": pids_limit },
        "blkio": {},
        "hugetlb": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_rules_follow_deny_all_sorted_like_runc() {
        let deny_all: LinuxDeviceCgroup =
            serde_json::from_str(r#"{"allow":false,"access":"rwm"}"#).unwrap();
        let fuse: LinuxDeviceCgroup = serde_json::from_str(
            r#"{"allow":true,"type":"c","major":10,"minor":229,"access":"rwm"}"#,
        )
        .unwrap();
        let lines: Vec<String> = ordered_device_rules(&[deny_all, fuse])
            .into_iter()
            .map(|(t, maj, min, acc, allow)| {
                format!(
                    "{} {}",
                    if allow { "+" } else { "-" },
                    device_rule(t, maj, min, &acc)
                )
            })
            .collect();
        assert_eq!(lines[0], "- a *:* rwm");
        assert_eq!(lines[1], "+ b *:* m");
        assert_eq!(lines[2], "+ c *:* m");
        assert_eq!(lines[3], "+ c 1:3 rwm");
        let fuse_at = lines.iter().position(|l| l == "+ c 10:229 rwm").unwrap();
        assert_eq!(lines[fuse_at - 1], "+ c 10:200 rwm");
        assert_eq!(lines.last().unwrap(), "+ c 136:* rwm");
    }

    #[test]
    fn v1_limits_land_in_each_controllers_hierarchy() {
        use crate::cgroups::CgroupDir;
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<CgroupDir> = ["memory", "cpu", "pids", "cpuset", "blkio"]
            .iter()
            .map(|c| {
                let path = root.path().join(c);
                std::fs::create_dir(&path).unwrap();
                CgroupDir {
                    controllers: vec![c.to_string()],
                    path,
                }
            })
            .collect();
        // blkio.weight exists on hosts without BFQ; this one has it.
        std::fs::write(root.path().join("blkio/blkio.weight"), "").unwrap();
        let paths = CgroupPaths {
            unified_only: false,
            dirs,
        };
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":16777216,"reservation":8388608,"swappiness":10,"disableOOMKiller":true},
                "cpu":{"shares":512,"quota":20000,"period":100000,"cpus":"0"},
                "pids":{"limit":7},
                "blockIO":{"weight":300,"throttleWriteIOPSDevice":[{"major":8,"minor":16,"rate":50}]}}"#,
        )
        .unwrap();
        apply(&paths, &r).unwrap();
        let f = |name: &str| std::fs::read_to_string(root.path().join(name)).unwrap();
        assert_eq!(f("memory/memory.limit_in_bytes"), "16777216");
        assert_eq!(f("memory/memory.soft_limit_in_bytes"), "8388608");
        assert_eq!(f("memory/memory.swappiness"), "10");
        assert_eq!(f("memory/memory.oom_control"), "1");
        assert_eq!(f("cpu/cpu.shares"), "512");
        assert_eq!(f("cpu/cpu.cfs_quota_us"), "20000");
        assert_eq!(f("cpu/cpu.cfs_period_us"), "100000");
        assert_eq!(f("cpuset/cpuset.cpus"), "0");
        assert_eq!(f("pids/pids.max"), "7");
        assert_eq!(f("blkio/blkio.weight"), "300");
        assert_eq!(f("blkio/blkio.throttle.write_iops_device"), "8:16 50");
    }

    #[test]
    fn a_blkio_weight_without_cfq_or_bfq_is_refused_naming_the_field() {
        use crate::cgroups::CgroupDir;
        let root = tempfile::tempdir().unwrap();
        let paths = CgroupPaths {
            unified_only: false,
            dirs: vec![CgroupDir {
                controllers: vec!["blkio".into()],
                path: root.path().to_path_buf(),
            }],
        };
        let r: LinuxResources = serde_json::from_str(r#"{"blockIO":{"weight":300}}"#).unwrap();
        let error = apply(&paths, &r).unwrap_err().to_string();
        assert!(
            error.contains("linux.resources.blockIO.weight") && error.contains("no CFQ or BFQ"),
            "{error}"
        );
    }

    #[test]
    fn swappiness_above_100_is_rejected_naming_the_field() {
        let root = tempfile::tempdir().unwrap();
        let paths = CgroupPaths {
            unified_only: false,
            dirs: vec![crate::cgroups::CgroupDir {
                controllers: vec!["memory".into()],
                path: root.path().to_path_buf(),
            }],
        };
        let r: LinuxResources = serde_json::from_str(r#"{"memory":{"swappiness":200}}"#).unwrap();
        let e = apply(&paths, &r).unwrap_err().to_string();
        assert!(e.contains("linux.resources.memory.swappiness"), "{e}");
    }

    #[test]
    fn device_rules_use_star_for_wildcards() {
        assert_eq!(device_rule('a', -1, -1, "rwm"), "a *:* rwm");
        assert_eq!(device_rule('c', 136, -1, "rwm"), "c 136:* rwm");
        assert_eq!(device_rule('b', 8, 0, "r"), "b 8:0 r");
    }
}
