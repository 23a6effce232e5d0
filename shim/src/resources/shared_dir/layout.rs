//! The pod's share on the host, in three mounts made once per sandbox:
//!
//! 1. the sandbox directory is bind-mounted onto itself and made private,
//!    so nothing mounted below it propagates to the host's other mount
//!    namespaces, and nothing they mount propagates into it;
//! 2. `<sandbox>/mounts` is a small tmpfs (`nosuid,nodev,noexec`, capped
//!    in bytes and inodes) where the shim, and only the shim, creates the
//!    container directories and bind mounts; it is a shared mount of its
//!    own peer group;
//! 3. `<sandbox>/share`, the directory virtio-fs serves, is a bind of
//!    `mounts` made a *slave* of it and remounted read-only: every bind the
//!    shim makes in `mounts` appears in `share` with its own flags (a
//!    container's rootfs read-write, a `ro` volume read-only), but the
//!    tree around them is read-only to the guest. The guest can never
//!    create, rename or replace an entry the host later walks.
//!
//! [`set_up`] makes the three, [`tear_down`] undoes them (the dead-shim
//! cleanup does the same from the mount table).

use std::path::Path;

use super::fd;

/// Directory (inside the sandbox directory) where the shim builds the share.
pub const HOST_SIDE_DIR: &str = "mounts";
/// Directory (inside the sandbox directory) that virtio-fs serves.
pub const GUEST_VIEW_DIR: &str = "share";

/// Size caps of the share's own tree (the tmpfs holding container
/// directories and mount points; the guest's writes land in the mounted
/// rootfs and volumes, never here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareTreeLimits {
    /// tmpfs `size=` in bytes.
    pub max_bytes: u64,
    /// tmpfs `nr_inodes=`.
    pub max_inodes: u64,
}

/// A failed step of the layout, naming it.
#[derive(Debug, thiserror::Error)]
#[error("cannot {step} {path}")]
pub struct LayoutError {
    pub step: &'static str,
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LayoutError + 'a {
    move |source| LayoutError {
        step,
        path: path.to_owned(),
        source,
    }
}

/// Makes the layout in the existing `sandbox_dir`. On error, whatever was
/// mounted is detached again.
pub fn set_up(sandbox_dir: &Path, limits: ShareTreeLimits) -> Result<(), LayoutError> {
    let result = set_up_steps(sandbox_dir, limits);
    if result.is_err() {
        tear_down(sandbox_dir);
    }
    result
}

fn set_up_steps(sandbox_dir: &Path, limits: ShareTreeLimits) -> Result<(), LayoutError> {
    fd::bind_path(sandbox_dir, sandbox_dir).map_err(step("bind-mount onto itself", sandbox_dir))?;
    fd::set_propagation(sandbox_dir, libc::MS_PRIVATE)
        .map_err(step("make private", sandbox_dir))?;

    let host_side = sandbox_dir.join(HOST_SIDE_DIR);
    std::fs::create_dir(&host_side).map_err(step("create", &host_side))?;
    let options = format!(
        "size={},nr_inodes={},mode=0755",
        limits.max_bytes, limits.max_inodes
    );
    fd::mount_tmpfs(
        &host_side,
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &options,
    )
    .map_err(step("mount the share's tmpfs on", &host_side))?;
    fd::set_propagation(&host_side, libc::MS_PRIVATE).map_err(step("make private", &host_side))?;
    fd::set_propagation(&host_side, libc::MS_SHARED).map_err(step("make shared", &host_side))?;

    let guest_view = sandbox_dir.join(GUEST_VIEW_DIR);
    std::fs::create_dir(&guest_view).map_err(step("create", &guest_view))?;
    fd::bind_path(&host_side, &guest_view).map_err(step("bind-mount the share at", &guest_view))?;
    fd::set_propagation(&guest_view, libc::MS_SLAVE)
        .map_err(step("make a slave of the share", &guest_view))?;
    let view = fd::path_cstring(&guest_view).map_err(step("name", &guest_view))?;
    fd::remount_bind(
        &view,
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )
    .map_err(step("remount read-only", &guest_view))?;
    Ok(())
}

/// Detaches the guest view, the tmpfs and the private self-bind (whatever
/// of them exists), without following symlinks. Mounts below them go
/// with them (lazy unmounts of whole trees).
pub fn tear_down(sandbox_dir: &Path) {
    for dir in [
        sandbox_dir.join(GUEST_VIEW_DIR),
        sandbox_dir.join(HOST_SIDE_DIR),
        sandbox_dir.to_owned(),
    ] {
        let mounted = super::super::cleanup::mounts_below(&dir).contains(&dir);
        if !mounted {
            continue;
        }
        if let Ok(target) = fd::path_cstring(&dir) {
            if let Err(error) = fd::detach(&target) {
                tracing::warn!(%error, dir = %dir.display(), "cannot unmount a share layer");
            }
        }
    }
}
