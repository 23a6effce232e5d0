//! Leaving the initramfs. The kernel starts PID 1 on `rootfs`, the root of
//! the mount tree, which pivot_root(2) refuses to move (EINVAL: it has no
//! parent mount): no container could then pivot into its own root. So at
//! boot the agent bind-mounts the initramfs onto a directory of itself,
//! moves that mount onto `/` and chroots into it. The root is then an
//! ordinary mount with a parent, and container runtimes can pivot away
//! from it. Nothing is copied: the bind mount shows the very files the
//! kernel unpacked, so the guest holds the agent once, and PID 1 goes on
//! running the same binary without re-executing it. (Copying the
//! initramfs into a tmpfs and re-executing `/init` from there cost about
//! 100 ms of a TCG boot.)

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// Where the initramfs is bind-mounted before that mount is moved onto `/`.
const STAGING: &str = "/.husk-root";

/// Errors while leaving the initramfs; each names the path that failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchRootError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {action} {path}: {source}")]
    Sys {
        action: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SwitchRootError + 'a {
    move |source| SwitchRootError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn sys_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> SwitchRootError + 'a {
    move |source| SwitchRootError::Sys {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Makes a bind mount of the initramfs the root (see the module header).
pub fn leave_rootfs() -> Result<(), SwitchRootError> {
    let staging = Path::new(STAGING);
    std::fs::create_dir_all(staging).map_err(io_error("create", staging))?;
    mount(
        Some("/"),
        staging,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys_error("bind-mount the initramfs onto", staging))?;
    std::env::set_current_dir(staging).map_err(io_error("enter", staging))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys_error("move onto /", staging))?;
    nix::unistd::chroot(".").map_err(sys_error("chroot into", staging))?;
    std::env::set_current_dir("/").map_err(io_error("enter", Path::new("/")))?;
    // The staging directory shows through the bind mount, empty.
    std::fs::remove_dir(staging).map_err(io_error("remove", staging))
}
