//! The pod pays for its VM: the shim moves itself into the pod sandbox's
//! cgroup (the sandbox spec's `linux.cgroupsPath`, Kata's
//! `sandbox_cgroup_only` model) before it starts the VMM or any device
//! thread, so QEMU, the device models and their memory are charged where
//! kubelet accounts and evicts for the pod.
//!
//! cgroup v1 (one hierarchy per controller, as on this project's CI hosts)
//! and v2 are both handled: the path is joined in every mounted hierarchy.
//! A systemd-style path (`slice:prefix:name`, what kubelet's systemd driver
//! sends) is expanded to the cgroupfs directory systemd would use; the
//! scope is not registered with systemd.
//!
//! What the shim created is recorded in the sandbox directory
//! (`cgroups`), so the cleanup of a dead shim (`shim delete`) removes it too.
//! Before removing, a shim still inside moves back to where it came from.
//!
//! Before joining, the VM's size is checked against the limits the cgroup
//! and its ancestors already enforce: a VM that cannot fit is refused at
//! Create, naming both numbers.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The record of what was created, in the sandbox directory.
pub const RECORD_FILE: &str = "cgroups";

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// v1 controllers (`cpu`, `memory`, `name=systemd`…); empty for v2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// The key of this hierarchy in `/proc/<pid>/cgroup` (the v1
    /// controller list, or empty for v2).
    fn proc_key(&self) -> String {
        self.controllers.join(",")
    }
}

/// The cgroup hierarchies mounted in this mount namespace.
pub fn hierarchies() -> Result<Vec<Hierarchy>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(parse_hierarchies(&text))
}

fn parse_hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let super_options = right.nth(1).unwrap_or_default();
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            super_options
                .split(',')
                .filter(|option| {
                    !matches!(
                        *option,
                        "rw" | "ro" | "noprefix" | "xattr" | "clone_children"
                    ) && !option.starts_with("release_agent=")
                })
                .map(str::to_owned)
                .collect()
        };
        found.push(Hierarchy {
            mount: PathBuf::from(mount.replace("\\040", " ")),
            controllers,
            v2,
        });
    }
    found
}

/// The cgroupfs-relative directory for a spec's `cgroupsPath`: a path as
/// given (relative paths are taken from the root), or a systemd
/// `slice:prefix:name` expanded as systemd would.
pub fn relative_dir(cgroups_path: &str) -> Result<PathBuf> {
    let relative = if !cgroups_path.starts_with('/') && cgroups_path.matches(':').count() == 2 {
        let mut parts = cgroups_path.splitn(3, ':');
        let (slice, prefix, name) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let mut dir = expand_slice(if slice.is_empty() {
            "system.slice"
        } else {
            slice
        })?;
        let unit = if name.ends_with(".slice") {
            name.to_owned()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        dir.push(unit);
        dir
    } else {
        PathBuf::from(cgroups_path.trim_start_matches('/'))
    };
    for component in relative.components() {
        if !matches!(component, std::path::Component::Normal(_)) {
            bail!("linux.cgroupsPath {cgroups_path:?} has a component other than a plain name");
        }
    }
    if relative.as_os_str().is_empty() {
        bail!("linux.cgroupsPath {cgroups_path:?} names the root cgroup");
    }
    Ok(relative)
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(slice: &str) -> Result<PathBuf> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        bail!("systemd cgroup parent {slice:?} does not end in .slice");
    };
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    let mut dir = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            bail!("systemd cgroup parent {slice:?} has an empty part");
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dir.push(format!("{prefix}.slice"));
    }
    Ok(dir)
}

/// The tightest limit a cgroup and its existing ancestors enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub value: u64,
    /// Which file said so (`/sys/fs/cgroup/memory/kubepods/memory.limit_in_bytes`).
    pub source: PathBuf,
}

/// Memory limit in bytes for `relative`, if any is set.
pub fn memory_limit(hierarchies: &[Hierarchy], relative: &Path) -> Option<Limit> {
    let (hierarchy, file) = hierarchies
        .iter()
        .find(|h| h.has("memory"))
        .map(|h| (h, "memory.limit_in_bytes"))
        .or_else(|| hierarchies.iter().find(|h| h.v2).map(|h| (h, "memory.max")))?;
    tightest(hierarchy, relative, file, |text| {
        let value: u64 = text.trim().parse().ok()?;
        // v1 reports "no limit" as a page-rounded i64::MAX.
        (value < (1 << 62)).then_some(value)
    })
}

/// CPU limit in whole CPUs (quota / period, rounded up) for `relative`.
pub fn cpu_limit(hierarchies: &[Hierarchy], relative: &Path) -> Option<Limit> {
    if let Some(v1) = hierarchies.iter().find(|h| h.has("cpu")) {
        return tightest_with(v1, relative, |dir| {
            let quota: i64 = fs::read_to_string(dir.join("cpu.cfs_quota_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let period: i64 = fs::read_to_string(dir.join("cpu.cfs_period_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (quota > 0 && period > 0)
                .then(|| (quota as u64).div_ceil(period as u64))
                .map(|cpus| (cpus, dir.join("cpu.cfs_quota_us")))
        });
    }
    let v2 = hierarchies.iter().find(|h| h.v2)?;
    tightest(v2, relative, "cpu.max", |text| {
        let mut fields = text.split_whitespace();
        let quota: u64 = fields.next()?.parse().ok()?;
        let period: u64 = fields.next()?.parse().ok()?;
        (period > 0).then(|| quota.div_ceil(period))
    })
}

fn tightest(
    hierarchy: &Hierarchy,
    relative: &Path,
    file: &str,
    parse: impl Fn(&str) -> Option<u64>,
) -> Option<Limit> {
    tightest_with(hierarchy, relative, |dir| {
        let path = dir.join(file);
        let value = parse(&fs::read_to_string(&path).ok()?)?;
        Some((value, path))
    })
}

fn tightest_with(
    hierarchy: &Hierarchy,
    relative: &Path,
    read: impl Fn(&Path) -> Option<(u64, PathBuf)>,
) -> Option<Limit> {
    let mut best: Option<Limit> = None;
    for ancestor in relative.ancestors() {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        if let Some((value, source)) = read(&hierarchy.mount.join(ancestor)) {
            if best.as_ref().is_none_or(|b| value < b.value) {
                best = Some(Limit { value, source });
            }
        }
    }
    best
}

/// Refuses a VM of `vcpus` and `memory_mib` that the limits of the cgroup
/// at `relative` cannot hold. `memory_from` and `vcpus_from` say where
/// each number came from (an annotation or a setting).
pub fn check_vm_fits(
    hierarchies: &[Hierarchy],
    relative: &Path,
    vcpus: u32,
    memory_mib: u64,
    memory_from: &str,
    vcpus_from: &str,
) -> Result<()> {
    if let Some(limit) = memory_limit(hierarchies, relative) {
        if memory_mib.saturating_mul(1 << 20) > limit.value {
            bail!(
                "the pod's VM would have {memory_mib} MiB of memory ({memory_from}), above the {} MiB its cgroup allows ({})",
                limit.value >> 20,
                limit.source.display()
            );
        }
    }
    if let Some(limit) = cpu_limit(hierarchies, relative) {
        if u64::from(vcpus) > limit.value {
            bail!(
                "the pod's VM would have {vcpus} vCPUs ({vcpus_from}), above the {} CPUs its cgroup allows ({})",
                limit.value,
                limit.source.display()
            );
        }
    }
    Ok(())
}

/// One hierarchy the shim joined: where it was before, and the directories
/// it created (deepest last).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Joined {
    mount: PathBuf,
    origin: PathBuf,
    created: Vec<PathBuf>,
}

/// Moves the calling process into `relative` in every hierarchy, creating
/// what is missing, and records it in `sandbox_dir` for the cleanup.
pub fn join(hierarchies: &[Hierarchy], relative: &Path, sandbox_dir: &Path) -> Result<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let mut joined: Vec<Joined> = Vec::new();
    let result = (|| {
        for hierarchy in hierarchies {
            let origin = own_cgroup(&own, hierarchy).ok_or_else(|| {
                anyhow!(
                    "the shim's cgroup in {} is unknown",
                    hierarchy.mount.display()
                )
            })?;
            let target = hierarchy.mount.join(relative);
            let mut created = Vec::new();
            let mut missing: Vec<&Path> = relative
                .ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .filter(|a| !hierarchy.mount.join(a).exists())
                .collect();
            missing.reverse();
            for dir in missing {
                let dir = hierarchy.mount.join(dir);
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    // Another pod made a shared parent first: it is theirs.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(error) => {
                        return Err(error)
                            .with_context(|| format!("cannot create cgroup {}", dir.display()))
                    }
                }
                created.push(dir.clone());
                if hierarchy.has("cpuset") {
                    inherit_cpuset(&dir)?;
                }
            }
            joined.push(Joined {
                mount: hierarchy.mount.clone(),
                origin,
                created,
            });
            write_record(sandbox_dir, &joined)?;
            move_self_to(&target)?;
        }
        Ok(())
    })();
    if let Err(error) = result {
        release(&joined);
        let _ = fs::remove_file(sandbox_dir.join(RECORD_FILE));
        return Err(error);
    }
    Ok(relative.to_owned())
}

/// v1 cpuset cgroups start empty and refuse tasks until given CPUs and
/// memory nodes: the parent's are copied.
fn inherit_cpuset(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let value = fs::read_to_string(parent.join(file))
            .with_context(|| format!("cannot read {}", parent.join(file).display()))?;
        fs::write(dir.join(file), value.trim())
            .with_context(|| format!("cannot write {}", dir.join(file).display()))?;
    }
    Ok(())
}

fn move_self_to(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("cannot open {}", procs.display()))?;
    file.write_all(std::process::id().to_string().as_bytes())
        .with_context(|| format!("cannot move the shim into {}", dir.display()))
}

/// The cgroup of this process in `hierarchy`, from `/proc/self/cgroup`.
fn own_cgroup(proc_cgroup: &str, hierarchy: &Hierarchy) -> Option<PathBuf> {
    let key = hierarchy.proc_key();
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let same = if hierarchy.v2 {
            controllers.is_empty()
        } else {
            let mut listed: Vec<&str> = controllers.split(',').collect();
            let mut wanted: Vec<&str> = key.split(',').collect();
            listed.sort_unstable();
            wanted.sort_unstable();
            listed == wanted
        };
        same.then(|| hierarchy.mount.join(path.trim_start_matches('/')))
    })
}

fn write_record(sandbox_dir: &Path, joined: &[Joined]) -> Result<()> {
    let mut text = String::new();
    for j in joined {
        text.push_str(&format!(
            "mount\t{}\norigin\t{}\n",
            j.mount.display(),
            j.origin.display()
        ));
        for dir in &j.created {
            text.push_str(&format!("created\t{}\n", dir.display()));
        }
    }
    let path = sandbox_dir.join(RECORD_FILE);
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn read_record(sandbox_dir: &Path) -> Vec<Joined> {
    let Ok(text) = fs::read_to_string(sandbox_dir.join(RECORD_FILE)) else {
        return Vec::new();
    };
    let mut joined: Vec<Joined> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('\t') else {
            continue;
        };
        match key {
            "mount" => joined.push(Joined {
                mount: value.into(),
                origin: PathBuf::new(),
                created: Vec::new(),
            }),
            "origin" => {
                if let Some(last) = joined.last_mut() {
                    last.origin = value.into();
                }
            }
            "created" => {
                if let Some(last) = joined.last_mut() {
                    last.created.push(value.into());
                }
            }
            _ => {}
        }
    }
    joined
}

/// Removes what the pod's shim created (recorded in `sandbox_dir`), moving
/// this process back out first if it is inside. Runs in the shim at
/// teardown and in `shim delete` after a dead shim.
pub fn release_recorded(sandbox_dir: &Path) {
    release(&read_record(sandbox_dir));
}

fn release(joined: &[Joined]) {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for j in joined {
        let inside = j.created.iter().any(|dir| {
            own.lines().any(|line| {
                line.rsplit(':')
                    .next()
                    .is_some_and(|path| j.mount.join(path.trim_start_matches('/')) == *dir)
            })
        });
        if inside && !j.origin.as_os_str().is_empty() {
            if let Err(error) = move_self_to(&j.origin) {
                tracing::warn!(%error, "cannot move the shim back to its own cgroup");
            }
        }
        // The pod's own directory may wait for its last process to exit;
        // a parent it created is removed only if no other pod uses it now.
        let mut deepest_first = j.created.iter().rev();
        if let Some(leaf) = deepest_first.next() {
            remove_cgroup_dir(leaf);
        }
        for parent in deepest_first {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// rmdir of a cgroup whose last process may still be exiting.
fn remove_cgroup_dir(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error)
                if Instant::now() < deadline && error.raw_os_error() == Some(libc::EBUSY) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot remove the pod's cgroup");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_hierarchies_are_found_in_mountinfo() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
        let found = parse_hierarchies(mountinfo);
        assert_eq!(found.len(), 4);
        assert!(found[0].v2);
        assert_eq!(found[1].controllers, ["memory"]);
        assert_eq!(found[2].controllers, ["cpu", "cpuacct"]);
        assert_eq!(found[3].controllers, ["name=systemd"]);
        let proc_cgroup = "4:cpu,cpuacct:/default\n3:name=systemd:/x\n1:memory:/a/b\n0::/u\n";
        assert_eq!(
            own_cgroup(proc_cgroup, &found[2]),
            Some("/sys/fs/cgroup/cpu,cpuacct/default".into())
        );
        assert_eq!(
            own_cgroup(proc_cgroup, &found[1]),
            Some("/sys/fs/cgroup/memory/a/b".into())
        );
        assert_eq!(
            own_cgroup(proc_cgroup, &found[0]),
            Some("/sys/fs/cgroup/unified/u".into())
        );
    }

    #[test]
    fn cgroupfs_and_systemd_paths_become_directories() {
        assert_eq!(
            relative_dir("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            relative_dir("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope")
        );
        assert!(relative_dir("/a/../../etc").is_err());
        assert!(relative_dir("/").is_err());
        assert!(
            relative_dir("bad:x:y").is_err(),
            "a slice must end in .slice"
        );
    }
}
