//! One OCI mount: turning its option strings into mount flags, propagation
//! and file system data, and performing it at a destination already
//! resolved inside the rootfs.
//!
//! Bind mounts need two steps because the kernel ignores most flags on the
//! first `MS_BIND`: bind, then remount with the requested flags, keeping the
//! flags the kernel locks on mounts from a less privileged namespace
//! (nosuid, nodev, noexec), as runc does. A `cgroup` mount on a v1 host is a
//! tmpfs with one bind mount per hierarchy of the container's cgroup.

use crate::cgroups::CgroupPaths;
use crate::error::{Context, Error, Result};
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Mount;
use std::path::{Path, PathBuf};

/// Flags, propagation and data parsed from a mount's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Flags explicitly cleared (e.g. `rw`, `suid`), for bind remounts.
    pub cleared: MsFlags,
    pub propagation: Vec<MsFlags>,
    pub data: Vec<String>,
}

/// The `MS_*` propagation flags of an option, if it is one.
pub fn propagation_flag(opt: &str) -> Option<MsFlags> {
    Some(match opt {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            cleared: MsFlags::empty(),
            propagation: Vec::new(),
            data: Vec::new(),
        }
    }
}

/// Parse mount option strings.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in options {
        // (set, flag): set=false clears the flag.
        let flag = match opt.as_str() {
            "ro" => Some((true, MsFlags::MS_RDONLY)),
            "rw" => Some((false, MsFlags::MS_RDONLY)),
            "nosuid" => Some((true, MsFlags::MS_NOSUID)),
            "suid" => Some((false, MsFlags::MS_NOSUID)),
            "nodev" => Some((true, MsFlags::MS_NODEV)),
            "dev" => Some((false, MsFlags::MS_NODEV)),
            "noexec" => Some((true, MsFlags::MS_NOEXEC)),
            "exec" => Some((false, MsFlags::MS_NOEXEC)),
            "sync" => Some((true, MsFlags::MS_SYNCHRONOUS)),
            "async" => Some((false, MsFlags::MS_SYNCHRONOUS)),
            "dirsync" => Some((true, MsFlags::MS_DIRSYNC)),
            "remount" => Some((true, MsFlags::MS_REMOUNT)),
            "mand" => Some((true, MsFlags::MS_MANDLOCK)),
            "nomand" => Some((false, MsFlags::MS_MANDLOCK)),
            "atime" => Some((false, MsFlags::MS_NOATIME)),
            "noatime" => Some((true, MsFlags::MS_NOATIME)),
            "diratime" => Some((false, MsFlags::MS_NODIRATIME)),
            "nodiratime" => Some((true, MsFlags::MS_NODIRATIME)),
            "bind" => Some((true, MsFlags::MS_BIND)),
            "rbind" => Some((true, MsFlags::MS_BIND | MsFlags::MS_REC)),
            "relatime" => Some((true, MsFlags::MS_RELATIME)),
            "norelatime" => Some((false, MsFlags::MS_RELATIME)),
            "strictatime" => Some((true, MsFlags::MS_STRICTATIME)),
            "nostrictatime" => Some((false, MsFlags::MS_STRICTATIME)),
            "lazytime" => Some((true, MsFlags::MS_LAZYTIME)),
            "nolazytime" => Some((false, MsFlags::MS_LAZYTIME)),
            "silent" => Some((true, MsFlags::MS_SILENT)),
            "loud" => Some((false, MsFlags::MS_SILENT)),
            "defaults" => None,
            "tmpcopyup" => None,
            _ => {
                if let Some(p) = propagation_flag(opt) {
                    o.propagation.push(p);
                } else {
                    o.data.push(opt.clone());
                }
                None
            }
        };
        if let Some((set, f)) = flag {
            if set {
                o.flags |= f;
                o.cleared &= !f;
            } else {
                o.flags &= !f;
                o.cleared |= f;
            }
        }
    }
    o
}

/// What the mount is, decided from its type and options.
fn is_bind(m: &Mount, opts: &MountOptions) -> bool {
    m.typ().as_deref() == Some("bind") || opts.flags.contains(MsFlags::MS_BIND)
}

/// Context a mount needs besides its own fields.
pub struct MountContext<'a> {
    pub bundle: &'a Path,
    pub cgroups: &'a CgroupPaths,
    /// True when the container has its own cgroup namespace.
    pub cgroupns: bool,
    /// True in a new user namespace (mknod is impossible there).
    pub userns: bool,
}

/// Statfs flags of the mount at `path` that must be kept on a bind remount.
fn locked_flags(path: &Path) -> MsFlags {
    let Ok(st) = nix::sys::statvfs::statvfs(path) else {
        return MsFlags::empty();
    };
    use nix::sys::statvfs::FsFlags;
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    out
}

/// Create the mount point at `dest` (a directory, or a file when binding a
/// file).
fn create_mount_point(dest: &Path, file: bool) -> Result<()> {
    if file {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).at("create mount point", parent)?;
        }
        if std::fs::symlink_metadata(dest).is_err() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(dest)
                .at("create mount point", dest)?;
        }
        Ok(())
    } else {
        std::fs::create_dir_all(dest).at("create mount point", dest)
    }
}

/// Bind `src` onto `dest`, then apply `flags` with a remount.
pub fn bind_mount(src: &Path, dest: &Path, opts: &MountOptions) -> Result<()> {
    let rec = opts.flags & MsFlags::MS_REC;
    mount(
        Some(src),
        dest,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .at("bind mount", dest)?;
    let wanted = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
    if !wanted.is_empty() {
        let keep = locked_flags(dest) & !opts.cleared;
        mount(
            None::<&str>,
            dest,
            None::<&str>,
            wanted | keep | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .at("remount bind", dest)?;
    }
    apply_propagation(dest, opts)
}

fn apply_propagation(dest: &Path, opts: &MountOptions) -> Result<()> {
    for p in &opts.propagation {
        mount(None::<&str>, dest, None::<&str>, *p, None::<&str>)
            .at("set mount propagation", dest)?;
    }
    Ok(())
}

/// Perform `m` at `dest` (already resolved inside the rootfs).
pub fn mount_one(m: &Mount, dest: &Path, ctx: &MountContext<'_>) -> Result<()> {
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let typ = m.typ().clone().unwrap_or_default();
    if is_bind(m, &opts) {
        let src = m.source().clone().unwrap_or_default();
        let src: PathBuf = if src.is_absolute() {
            src
        } else {
            ctx.bundle.join(src)
        };
        let is_file = !std::fs::metadata(&src)
            .at("stat bind source", &src)?
            .is_dir();
        create_mount_point(dest, is_file)?;
        return bind_mount(&src, dest, &opts);
    }
    create_mount_point(dest, false)?;
    if typ == "cgroup" || typ == "cgroup2" {
        return mount_cgroup(dest, &opts, ctx);
    }
    let data = opts.data.join(",");
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
    let flags = opts.flags & !MsFlags::MS_REMOUNT;
    let res = mount(
        Some(&source),
        dest,
        Some(typ.as_str()),
        flags,
        if data.is_empty() {
            None
        } else {
            Some(data.as_str())
        },
    );
    match res {
        Ok(()) => {}
        // sysfs cannot be mounted when the network namespace is the host's
        // and the user namespace is not: bind the host's instead, as runc.
        Err(nix::errno::Errno::EPERM) if typ == "sysfs" && ctx.userns => {
            let bind = MountOptions {
                flags: opts.flags | MsFlags::MS_BIND | MsFlags::MS_REC,
                ..opts.clone()
            };
            return bind_mount(Path::new("/sys"), dest, &bind);
        }
        Err(e) => {
            return Err(Error::Sys {
                op: "mount",
                what: format!("{typ} on {}", dest.display()),
                source: e,
            })
        }
    }
    apply_propagation(dest, &opts)
}

/// The container's cgroups under `dest`.
fn mount_cgroup(dest: &Path, opts: &MountOptions, ctx: &MountContext<'_>) -> Result<()> {
    let flags = opts.flags
        & !(MsFlags::MS_RDONLY | MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_REC);
    if ctx.cgroups.unified_only {
        // In its own cgroup namespace a fresh mount shows the container's
        // cgroup as the root. Without one it would show the whole
        // hierarchy, so, as runc, the container's own directory is bound
        // there instead: either way the container reads its own limits.
        let own = ctx.cgroups.dirs.iter().find(|dir| dir.is_unified());
        match own {
            Some(dir) if !ctx.cgroupns => {
                let bind = MountOptions {
                    flags: opts.flags | MsFlags::MS_BIND | MsFlags::MS_REC,
                    ..Default::default()
                };
                return bind_mount(&dir.path, dest, &bind);
            }
            _ => {
                mount(
                    Some("cgroup2"),
                    dest,
                    Some("cgroup2"),
                    opts.flags & !MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .at("mount cgroup2", dest)?;
                return Ok(());
            }
        }
    }
    mount(Some("tmpfs"), dest, Some("tmpfs"), flags, Some("mode=755"))
        .at("mount cgroup tmpfs", dest)?;
    // As runc: the v1 hierarchies only (no `unified` in hybrid mode), and
    // the tmpfs stays writable while each hierarchy gets the mount's flags.
    for dir in ctx.cgroups.dirs.iter().filter(|d| !d.is_unified()) {
        let name = if dir.is_unified() {
            "unified".to_string()
        } else {
            dir.controllers
                .iter()
                .map(|c| c.strip_prefix("name=").unwrap_or(c))
                .collect::<Vec<_>>()
                .join(",")
        };
        let sub = dest.join(&name);
        std::fs::create_dir_all(&sub).at("create cgroup mount point", &sub)?;
        if ctx.cgroupns {
            let (fstype, data) = if dir.is_unified() {
                ("cgroup2", String::new())
            } else {
                ("cgroup", dir.controllers.join(","))
            };
            mount(
                Some("cgroup"),
                &sub,
                Some(fstype),
                opts.flags & !MsFlags::MS_REMOUNT,
                if data.is_empty() {
                    None
                } else {
                    Some(data.as_str())
                },
            )
            .at("mount cgroup", &sub)?;
        } else {
            let bind = MountOptions {
                flags: opts.flags | MsFlags::MS_BIND | MsFlags::MS_REC,
                ..Default::default()
            };
            bind_mount(&dir.path, &sub, &bind)?;
        }
        // Co-mounted controllers also appear under each single name.
        if dir.controllers.len() > 1 {
            for c in &dir.controllers {
                let link = dest.join(c);
                if std::fs::symlink_metadata(&link).is_err() {
                    std::os::unix::fs::symlink(&name, &link).at("symlink", &link)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> MountOptions {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_data_and_propagation_are_separated() {
        let o = opts(&[
            "nosuid",
            "noexec",
            "mode=755",
            "size=65536k",
            "rslave",
            "ro",
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
    }

    #[test]
    fn later_option_overrides_earlier() {
        let o = opts(&["ro", "rw", "rbind"]);
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
        assert!(o.cleared.contains(MsFlags::MS_RDONLY));
        assert!(o.flags.contains(MsFlags::MS_BIND | MsFlags::MS_REC));
    }
}
