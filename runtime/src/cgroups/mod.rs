//! Control groups: where the container's cgroup lives, creating and
//! removing it, joining processes, applying resource limits, freezing, and
//! reading statistics.
//!
//! The layout is discovered, not assumed: `/proc/self/mountinfo` tells which
//! hierarchies are mounted where (v1 controllers, named v1 hierarchies such
//! as `name=systemd`, and the unified v2 hierarchy, alone or in hybrid mode),
//! and `/proc/self/cgroup` gives the runtime's own place in each. The
//! container gets one directory per hierarchy, chosen by runc's rule: an
//! absolute `cgroupsPath` is taken from the hierarchy's root, a relative one
//! (or the container id when none is given) from the runtime's own cgroup.
//! Resource files are written by [`v1`] or [`v2`] depending on the mode.

pub mod v1;
pub mod v2;

use crate::error::{Error, Result};
use husk_mountinfo::MountInfo;
use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How long `destroy` keeps retrying `rmdir` on a cgroup that is still busy
/// (its last processes are exiting).
const RMDIR_RETRY_MS: u64 = 2_000;

/// One hierarchy's directory for the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupDir {
    /// The v1 controllers of the hierarchy (`["cpu"]`, `["name=systemd"]`),
    /// empty for the unified hierarchy.
    pub controllers: Vec<String>,
    /// Absolute path of the container's directory.
    pub path: PathBuf,
}

impl CgroupDir {
    /// Whether this is the v2 (unified) hierarchy.
    pub fn is_unified(&self) -> bool {
        self.controllers.is_empty()
    }
}

/// The container's cgroup directories.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupPaths {
    /// True when the host runs the unified hierarchy only.
    pub unified_only: bool,
    pub dirs: Vec<CgroupDir>,
}

/// A cgroup file system mount from mountinfo.
#[derive(Debug, Clone)]
struct CgroupMount {
    mountpoint: PathBuf,
    root: PathBuf,
    /// Controllers from the super options; empty for cgroup2.
    controllers: Vec<String>,
    unified: bool,
}

/// The cgroup and cgroup2 mounts of a mount table, paths byte-exact.
fn cgroup_mounts(mounts: &[MountInfo]) -> Vec<CgroupMount> {
    mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| {
            let unified = m.fs_type == "cgroup2";
            let controllers = if unified {
                Vec::new()
            } else {
                m.super_options
                    .split(',')
                    .filter(|o| {
                        !matches!(*o, "rw" | "ro")
                            && !o.starts_with("release_agent")
                            && *o != "clone_children"
                            && *o != "noprefix"
                            && *o != "xattr"
                            && *o != "cpuset_v2_mode"
                    })
                    .map(str::to_string)
                    .collect()
            };
            CgroupMount {
                mountpoint: m.mount_point.clone(),
                root: m.root.clone(),
                controllers,
                unified,
            }
        })
        .collect()
}

fn relative(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}

impl CgroupPaths {
    /// Work out the container's directories from `cgroupsPath` (or `id`).
    pub fn for_container(cgroups_path: Option<&Path>, id: &str) -> Result<Self> {
        let mounts = husk_mountinfo::read_self()?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| Error::Cgroup {
            path: "/proc/self/cgroup".into(),
            message: e.to_string(),
        })?;
        Ok(Self::compute(&mounts, &own, cgroups_path, id))
    }

    fn compute(mounts: &[MountInfo], own: &str, cgroups_path: Option<&Path>, id: &str) -> Self {
        let mounts = cgroup_mounts(mounts);
        let unified_only = !mounts.is_empty() && mounts.iter().all(|m| m.unified);
        let wanted: PathBuf = cgroups_path
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(id));
        let mut dirs = Vec::new();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(own_path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let controllers: Vec<String> = if ctrls.is_empty() {
                Vec::new()
            } else {
                ctrls.split(',').map(str::to_string).collect()
            };
            let mount = mounts.iter().find(|m| {
                if controllers.is_empty() {
                    m.unified
                } else {
                    !m.unified && controllers.iter().all(|c| m.controllers.contains(c))
                }
            });
            let Some(mount) = mount else { continue };
            if dirs.iter().any(|d: &CgroupDir| {
                d.path.starts_with(&mount.mountpoint) && d.controllers == controllers
            }) {
                continue;
            }
            let base = if wanted.is_absolute() {
                mount.mountpoint.clone()
            } else {
                let own_rel = Path::new(own_path)
                    .strip_prefix(&mount.root)
                    .unwrap_or(Path::new(own_path));
                mount.mountpoint.join(relative(own_rel))
            };
            dirs.push(CgroupDir {
                controllers,
                path: base.join(relative(&wanted)),
            });
        }
        Self { unified_only, dirs }
    }

    /// The directory carrying `controller`, if any.
    pub fn dir_for(&self, controller: &str) -> Option<&Path> {
        if self.unified_only {
            return self.dirs.first().map(|d| d.path.as_path());
        }
        self.dirs
            .iter()
            .find(|d| d.controllers.iter().any(|c| c == controller))
            .map(|d| d.path.as_path())
    }

    /// Create every directory (and prepare cpuset/v2 controllers).
    pub fn create(&self) -> Result<()> {
        for dir in &self.dirs {
            std::fs::create_dir_all(&dir.path).map_err(|e| Error::Cgroup {
                path: dir.path.clone(),
                message: format!("create: {e}"),
            })?;
            if dir.controllers.iter().any(|c| c == "cpuset") {
                v1::inherit_cpuset(&dir.path)?;
            }
            if dir.is_unified() && self.unified_only {
                v2::enable_controllers(&dir.path);
            }
        }
        Ok(())
    }

    /// Move `pid` into every directory.
    pub fn join(&self, pid: i32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.path, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Apply the spec's resource limits.
    pub fn apply(&self, resources: &LinuxResources) -> Result<()> {
        if self.unified_only {
            match self.dirs.first() {
                Some(d) => v2::apply(&d.path, resources),
                None => Ok(()),
            }
        } else {
            v1::apply(self, resources)
        }
    }

    /// Pids of every process in the container's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let dir = self
            .dir_for("pids")
            .or_else(|| self.dir_for("memory"))
            .or_else(|| self.dirs.first().map(|d| d.path.as_path()));
        let Some(dir) = dir else { return Vec::new() };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Freeze (`true`) or thaw every process.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        if self.unified_only {
            let d = self.dirs.first().ok_or_else(|| Error::Cgroup {
                path: PathBuf::new(),
                message: "no cgroup".into(),
            })?;
            v2::set_frozen(&d.path, frozen)
        } else {
            let d = self.dir_for("freezer").ok_or_else(|| Error::Cgroup {
                path: PathBuf::from("freezer"),
                message: "freezer controller is not mounted".into(),
            })?;
            v1::set_frozen(d, frozen)
        }
    }

    /// Whether the cgroup is frozen.
    pub fn is_frozen(&self) -> bool {
        if self.unified_only {
            self.dirs.first().is_some_and(|d| {
                std::fs::read_to_string(d.path.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
            })
        } else {
            self.dir_for("freezer").is_some_and(|d| {
                std::fs::read_to_string(d.join("freezer.state")).is_ok_and(|s| s.trim() != "THAWED")
            })
        }
    }

    /// Statistics in the shape of `runc events --stats` data.
    pub fn stats(&self) -> serde_json::Value {
        if self.unified_only {
            self.dirs
                .first()
                .map(|d| v2::stats(&d.path))
                .unwrap_or(serde_json::Value::Null)
        } else {
            v1::stats(self)
        }
    }

    /// Remove every directory, retrying while the last processes exit.
    pub fn destroy(&self) -> Result<()> {
        let mut first_error = None;
        for dir in &self.dirs {
            let deadline =
                std::time::Instant::now() + std::time::Duration::from_millis(RMDIR_RETRY_MS);
            loop {
                match std::fs::remove_dir(&dir.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        first_error.get_or_insert(Error::Cgroup {
                            path: dir.path.clone(),
                            message: format!("remove: {e}"),
                        });
                        break;
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Write `value` to `dir/file`, naming the file on failure.
pub fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| Error::Cgroup {
        path,
        message: format!("write {value:?}: {e}"),
    })
}

/// Read a file of `dir` as a trimmed string.
pub fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "9:name=systemd:/\n4:memory:/svc/abc\n1:cpu:/\n0::/\n";

    fn table(text: impl AsRef<[u8]>) -> Vec<MountInfo> {
        husk_mountinfo::parse(text).unwrap()
    }

    #[test]
    fn relative_path_lands_under_own_cgroup_per_hierarchy() {
        let p = CgroupPaths::compute(&table(HYBRID_MOUNTINFO), OWN, None, "c1");
        assert!(!p.unified_only);
        assert_eq!(
            p.dir_for("memory").unwrap(),
            Path::new("/sys/fs/cgroup/memory/svc/abc/c1")
        );
        assert_eq!(
            p.dir_for("cpu").unwrap(),
            Path::new("/sys/fs/cgroup/cpu/c1")
        );
        assert_eq!(
            p.dir_for("name=systemd").unwrap(),
            Path::new("/sys/fs/cgroup/systemd/c1")
        );
        assert!(p
            .dirs
            .iter()
            .any(|d| d.is_unified() && d.path == Path::new("/sys/fs/cgroup/unified/c1")));
    }

    #[test]
    fn absolute_path_lands_under_hierarchy_root() {
        let p = CgroupPaths::compute(&table(HYBRID_MOUNTINFO), OWN, Some(Path::new("/a/b")), "c1");
        assert_eq!(
            p.dir_for("memory").unwrap(),
            Path::new("/sys/fs/cgroup/memory/a/b")
        );
    }

    #[test]
    fn unified_only_host_has_one_directory() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let p = CgroupPaths::compute(&table(mi), "0::/user.slice\n", Some(Path::new("/x")), "c");
        assert!(p.unified_only);
        assert_eq!(p.dirs.len(), 1);
        assert_eq!(p.dir_for("memory").unwrap(), Path::new("/sys/fs/cgroup/x"));
    }

    /// Regression: the mount path decoder turned every byte into a `char`
    /// (Latin-1), so `ü` in a mount point became `Ã¼`, the root no longer
    /// prefixed the process's own cgroup and the container's directory was
    /// computed under a hierarchy that does not exist.
    #[test]
    fn non_ascii_mount_points_and_roots_are_kept_exactly() {
        let mi = "\
30 23 0:26 /k\u{fc}be\\040\u{5bb9}\u{5668} /sys/fs/cgroup/\u{fc}n\u{ef}c\u{f6}d\u{e9}\\040\u{6570}\u{636e} rw shared:4 - cgroup2 cgroup2 rw
31 23 0:27 / /sys/fs/cgroup/m\u{e9}moire\\134v1 rw - cgroup cgroup rw,memory
";
        let own = "4:memory:/svc\n0::/kübe 容器/pod\n";
        let p = CgroupPaths::compute(&table(mi), own, None, "c1");
        assert_eq!(
            p.dirs,
            [
                CgroupDir {
                    controllers: vec!["memory".into()],
                    path: "/sys/fs/cgroup/mémoire\\v1/svc/c1".into(),
                },
                CgroupDir {
                    controllers: vec![],
                    path: "/sys/fs/cgroup/ünïcödé 数据/pod/c1".into(),
                },
            ]
        );
        let p = CgroupPaths::compute(&table(mi), own, Some(Path::new("/abs")), "c1");
        assert_eq!(p.dirs[1].path, Path::new("/sys/fs/cgroup/ünïcödé 数据/abs"));
    }

    #[test]
    fn a_mount_point_that_is_not_utf8_is_kept_byte_for_byte() {
        use std::os::unix::ffi::OsStrExt;
        let mi = b"30 23 0:26 / /sys/fs/cgroup/\xff\xfe\\040x rw - cgroup2 cgroup2 rw\n";
        let p = CgroupPaths::compute(&table(mi), "0::/\n", None, "c1");
        assert!(p.unified_only);
        assert_eq!(
            p.dirs[0].path.as_os_str().as_bytes(),
            b"/sys/fs/cgroup/\xff\xfe x/c1"
        );
    }
}
