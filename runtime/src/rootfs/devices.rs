//! The container's `/dev`: the default device nodes every container gets,
//! the spec's `linux.devices`, the standard symlinks (`/dev/fd`, `/dev/stdin`
//! ...), `/dev/ptmx` pointing into the container's own devpts, and
//! `/dev/console` for a terminal.
//!
//! In a new user namespace `mknod` is not permitted, so nodes are bind
//! mounts of the host's, as runc does.

use crate::error::{Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};
use std::path::{Path, PathBuf};

/// One device node to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the container (`/dev/null`).
    pub path: PathBuf,
    pub kind: SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// runc's default devices: null, zero, full, tty, urandom, random.
pub fn default_devices() -> Vec<DeviceNode> {
    [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("tty", 5, 0),
        ("urandom", 1, 9),
        ("random", 1, 8),
    ]
    .iter()
    .map(|(n, maj, min)| DeviceNode {
        path: PathBuf::from(format!("/dev/{n}")),
        kind: SFlag::S_IFCHR,
        major: *maj,
        minor: *min,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

/// A spec device as a node.
pub fn from_spec(d: &LinuxDevice) -> DeviceNode {
    let kind = match d.typ() {
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        _ => SFlag::S_IFCHR,
    };
    DeviceNode {
        path: d.path().clone(),
        kind,
        major: d.major() as u64,
        minor: d.minor() as u64,
        mode: d.file_mode().unwrap_or(0o666),
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    }
}

/// Create `node` at `dest` (resolved inside the rootfs).
pub fn create_node(node: &DeviceNode, dest: &Path, bind_from_host: bool) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).at("create", parent)?;
    }
    if bind_from_host {
        if std::fs::symlink_metadata(dest).is_err() {
            std::fs::File::create(dest).at("create device mount point", dest)?;
        }
        mount(
            Some(&node.path),
            dest,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .at("bind device", dest)?;
        return Ok(());
    }
    let _ = std::fs::remove_file(dest);
    mknod(
        dest,
        node.kind,
        Mode::from_bits_truncate(node.mode),
        makedev(node.major, node.minor),
    )
    .at("mknod", dest)?;
    std::os::unix::fs::chown(dest, Some(node.uid), Some(node.gid)).at("chown", dest)?;
    Ok(())
}

/// The standard symlinks under `dev` (a path inside the rootfs).
pub fn create_symlinks(dev: &Path) -> Result<()> {
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("/proc/kcore", "core"));
    }
    for (target, name) in links {
        let link = dev.join(name);
        match std::os::unix::fs::symlink(target, &link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).at("symlink", link),
        }
    }
    Ok(())
}

/// Make `/dev/ptmx` a symlink to the container's own `pts/ptmx`.
pub fn setup_ptmx(dev: &Path) -> Result<()> {
    let ptmx = dev.join("ptmx");
    let _ = std::fs::remove_file(&ptmx);
    std::os::unix::fs::symlink("pts/ptmx", &ptmx).at("symlink", ptmx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_devices_are_the_six_runc_creates() {
        let names: Vec<_> = default_devices()
            .iter()
            .map(|d| d.path.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/tty",
                "/dev/urandom",
                "/dev/random"
            ]
        );
    }

    #[test]
    fn symlinks_point_into_proc_self() {
        let dir = tempfile::tempdir().unwrap();
        create_symlinks(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("stdout")).unwrap(),
            Path::new("/proc/self/fd/1")
        );
        setup_ptmx(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("ptmx")).unwrap(),
            Path::new("pts/ptmx")
        );
    }
}
