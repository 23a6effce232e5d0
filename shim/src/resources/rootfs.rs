//! The container's root filesystem on the host: containerd passes the
//! snapshot as `Mount`s in `Create`; the shim mounts them at
//! `<bundle>/rootfs` (as runc's shim does) and shares that directory with
//! the guest. `Delete` unmounts it again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_shim_protos::api::Mount;

use super::cleanup;

/// The bundle's rootfs directory.
pub fn bundle_rootfs(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts `mounts` in order onto `<bundle>/rootfs`. With no mounts the
/// bundle's rootfs directory is used as it is.
pub fn mount_rootfs(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf> {
    let target = bundle_rootfs(bundle);
    std::fs::create_dir_all(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    for (index, mount) in mounts.iter().enumerate() {
        let result = containerd_shim::mount::mount_rootfs(
            Some(mount.type_.as_str()).filter(|t| !t.is_empty()),
            Some(mount.source.as_str()).filter(|s| !s.is_empty()),
            &mount.options,
            &target,
        );
        if let Err(error) = result {
            unmount_rootfs(bundle);
            return Err(anyhow::anyhow!("{error}")).with_context(|| {
                format!(
                    "cannot mount rootfs layer {index} ({} {}) on {}",
                    mount.type_,
                    mount.source,
                    target.display()
                )
            });
        }
    }
    Ok(target)
}

/// Unmounts everything mounted on `<bundle>/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    cleanup::unmount_below(&bundle_rootfs(bundle));
}
