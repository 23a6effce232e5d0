//! The kernel filesystems every guest needs before anything else runs.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// One filesystem PID 1 mounts at boot.
struct KernelMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// Errors from mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create the mount point {target}: {source}")]
    CreateTarget {
        target: &'static str,
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        source: nix::Error,
    },
}

fn kernel_mounts() -> [KernelMount; 7] {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    [
        KernelMount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: hardened,
            data: None,
        },
        KernelMount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: hardened,
            data: None,
        },
        KernelMount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        KernelMount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        KernelMount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: hardened,
            data: Some("mode=1777"),
        },
        KernelMount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        KernelMount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: hardened,
            data: None,
        },
    ]
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and the cgroup2
/// hierarchy. A filesystem the kernel already mounted (devtmpfs with
/// `DEVTMPFS_MOUNT`) is left as it is.
pub fn mount_kernel_filesystems() -> Result<(), MountError> {
    for entry in kernel_mounts() {
        std::fs::create_dir_all(entry.target).map_err(|source| MountError::CreateTarget {
            target: entry.target,
            source,
        })?;
        if is_mount_point(entry.target) {
            continue;
        }
        mount(
            Some(entry.source),
            entry.target,
            Some(entry.fstype),
            entry.flags,
            entry.data,
        )
        .map_err(|source| MountError::Mount {
            fstype: entry.fstype,
            target: entry.target,
            source,
        })?;
    }
    Ok(())
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new(path);
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(own), Some(Ok(parent))) => own.dev() != parent.dev(),
        _ => false,
    }
}
