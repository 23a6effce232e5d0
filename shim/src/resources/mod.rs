//! The host resources of a pod and of each of its containers, and the one
//! guard that gives a container's back.
//!
//! A container's Create makes two kinds of host state: the rootfs layers
//! mounted on `<bundle>/rootfs` ([`rootfs`]), and that rootfs and the
//! host directories and files the container bind-mounts, bind-mounted
//! into the pod's share ([`SharedDirectory`]).
//! [`ContainerResources`] records each as it is made, and its `Drop` undoes
//! whatever was made, so a Create that fails at any step, a Delete, and the
//! shim's end all leave nothing. [`cleanup`] does the same from paths alone
//! after a shim died.

pub mod cleanup;
pub mod pod_cgroup;
pub mod rootfs;
mod shared_dir;

pub use shared_dir::{
    Access, ShareTreeLimits, SharedDirError, SharedDirectory, GUEST_VIEW_DIR, HOST_SIDE_DIR,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim_protos::api::Mount;
use oci_spec::runtime::Spec;

use crate::spec;

/// Why a container's host resources could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The rootfs layers containerd sent could not be mounted.
    #[error("cannot mount the container's rootfs: {0:#}")]
    Rootfs(anyhow::Error),
    /// The rootfs or a volume could not be put in the share.
    #[error("cannot share the container's files with the guest: {0}")]
    Share(#[from] SharedDirError),
    /// The spec asks for something the host cannot give (a missing bind
    /// source, say).
    #[error("{0:#}")]
    Spec(anyhow::Error),
}

/// The host resources of one container; dropping it undoes them all.
pub struct ContainerResources {
    container_id: String,
    bundle: PathBuf,
    /// Whether the rootfs layers were mounted by us (not a ready directory).
    mounted_rootfs: bool,
    /// The share, once the container's rootfs is in it.
    share: Option<Arc<SharedDirectory>>,
}

impl ContainerResources {
    /// Mounts the rootfs, shares it and the container's volumes with the
    /// guest, and returns the spec rewritten for the guest. On error,
    /// whatever was made is already undone.
    pub fn prepare(
        share: &Arc<SharedDirectory>,
        container_id: &str,
        bundle: &Path,
        rootfs_mounts: &[Mount],
        spec: Spec,
    ) -> Result<(Self, Spec), ResourceError> {
        let mut resources = Self {
            container_id: container_id.to_owned(),
            bundle: bundle.to_owned(),
            mounted_rootfs: false,
            share: None,
        };
        let rootfs_source =
            rootfs::mount_rootfs(bundle, rootfs_mounts).map_err(ResourceError::Rootfs)?;
        resources.mounted_rootfs = !rootfs_mounts.is_empty();
        share.add_container(container_id, &rootfs_source)?;
        resources.share = Some(share.clone());
        let guest_spec = spec::for_guest(container_id, spec, |index, source, read_only| {
            let access = if read_only {
                Access::ReadOnly
            } else {
                Access::ReadWrite
            };
            Ok(share
                .add_bind(container_id, index, source, access)?
                .to_string_lossy()
                .into_owned())
        })
        .map_err(ResourceError::Spec)?;
        Ok((resources, guest_spec))
    }

    /// Where the container's rootfs is, relative to the share root (the
    /// path the agent is given).
    pub fn rootfs_in_share(&self) -> Result<PathBuf, ResourceError> {
        Ok(SharedDirectory::rootfs_relative_path(&self.container_id)?)
    }
}

impl Drop for ContainerResources {
    fn drop(&mut self) {
        let id = &self.container_id;
        if let Some(share) = self.share.take() {
            if let Err(error) = share.remove_container(id) {
                tracing::warn!(%error, container_id = %id, "cannot remove the container from the share");
            }
        }
        if self.mounted_rootfs {
            rootfs::unmount_rootfs(&self.bundle);
        }
    }
}
