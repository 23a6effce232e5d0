//! Host-side management of a pod's share while the guest runs.
//!
//! The guest sees `<sandbox>/share`, a read-only view of the tmpfs
//! `<sandbox>/mounts` where the shim alone makes entries ([`layout`]).
//! Each container gets `<id>/` there, holding
//! - `rootfs`: a bind mount of the bundle's rootfs (read-write);
//! - `volumes/<n>`: the host directories it bind-mounts (mount `n` of its
//!   spec), read-only on the host itself when the spec says `ro`;
//! - `files/<n>-<random>`: the host files it bind-mounts (CRI's hosts,
//!   resolv.conf, hostname), bind-mounted, not copied, so they stay live,
//!   under names the guest cannot predict.
//!
//! Every bind is `nosuid,nodev` (on its whole tree, set before it is
//! attached, so the guest's view never sees it otherwise). Every step works on fds ([`fd`]): a bind
//! source is opened once and what was checked (a directory or a regular
//! file) is what gets mounted; targets are created with `mkdirat` /
//! `O_EXCL` and mounted through `/proc/self/fd/N`; each mount is
//! remembered by an fd on its root, so removal unmounts exactly what was
//! mounted.

mod fd;
pub mod layout;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

pub use layout::{ShareTreeLimits, GUEST_VIEW_DIR, HOST_SIDE_DIR};

/// The directory under `<id>` where the rootfs is mounted.
pub const ROOTFS_DIR_NAME: &str = "rootfs";
/// The directory under `<id>` holding the container's volumes (host
/// directories it bind-mounts), one numbered directory each.
pub const VOLUMES_DIR_NAME: &str = "volumes";
/// The directory under `<id>` holding the host files it bind-mounts.
pub const FILES_DIR_NAME: &str = "files";

/// Why the share or a container's entries in it could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum SharedDirError {
    /// The container id is unusable as a single path component.
    #[error("invalid container id {id:?}: {reason}")]
    InvalidContainerId { id: String, reason: &'static str },
    /// The share's mounts could not be made.
    #[error("cannot set up the pod's share")]
    Layout(#[from] layout::LayoutError),
    /// The shared directory cannot be opened.
    #[error("cannot open shared directory {path}: {source}")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The container is already in the share.
    #[error("container {id} is already in shared directory {root}")]
    AlreadyAdded { id: String, root: PathBuf },
    /// The container is not in the share.
    #[error("container {id} is not in shared directory {root}")]
    NotAdded { id: String, root: PathBuf },
    /// A bind source is neither a directory nor a regular file.
    #[error(
        "bind mount source {source_path} of container {id} is neither a directory nor a regular \
         file; device nodes, FIFOs and sockets cannot be shared into a VM"
    )]
    NotShareable { id: String, source_path: PathBuf },
    /// A file-system operation on the share failed.
    #[error("cannot {operation} {path} for container {id}: {source}")]
    Io {
        id: String,
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// What got mounted is not the source (the target was swapped under us).
    #[error(
        "the bind mount of {source_path} at {target} for container {id} does not show the source"
    )]
    MountMismatch {
        id: String,
        source_path: PathBuf,
        target: PathBuf,
    },
}

/// The shared directory of one pod and the container mounts in it.
pub struct SharedDirectory {
    sandbox_dir: PathBuf,
    /// What the guest sees: `<sandbox>/share`.
    view: PathBuf,
    /// Where the shim builds: `<sandbox>/mounts`.
    host_side: PathBuf,
    host_side_fd: OwnedFd,
    /// What this share mounted for each container.
    mounts: Mutex<HashMap<String, ContainerMounts>>,
}

/// The mounts of one container in the share, each remembered by an
/// `O_PATH` fd on its root so unmounting needs no path.
struct ContainerMounts {
    /// `<host side>/<id>`.
    dir: OwnedFd,
    /// Every bind mount of the container, the rootfs first.
    binds: Vec<OwnedFd>,
}

impl SharedDirectory {
    /// Makes the share's mounts in the existing `sandbox_dir` and opens it.
    pub fn create(sandbox_dir: &Path, limits: ShareTreeLimits) -> Result<Self, SharedDirError> {
        layout::set_up(sandbox_dir, limits)?;
        let host_side = sandbox_dir.join(HOST_SIDE_DIR);
        let opened = fd::path_cstring(&host_side)
            .and_then(|c| fd::open_path_at(libc::AT_FDCWD, &c, libc::O_DIRECTORY));
        match opened {
            Ok(host_side_fd) => Ok(Self {
                sandbox_dir: sandbox_dir.to_owned(),
                view: sandbox_dir.join(GUEST_VIEW_DIR),
                host_side,
                host_side_fd,
                mounts: Mutex::new(HashMap::new()),
            }),
            Err(source) => {
                layout::tear_down(sandbox_dir);
                Err(SharedDirError::OpenRoot {
                    path: host_side,
                    source,
                })
            }
        }
    }

    /// The host path the guest's view is served from (virtio-fs's root).
    pub fn root(&self) -> &Path {
        &self.view
    }

    /// Where a container's rootfs sits relative to the share root (and so
    /// relative to the guest's mount point): `<id>/rootfs`.
    pub fn rootfs_relative_path(id: &str) -> Result<PathBuf, SharedDirError> {
        validate_container_id(id)?;
        Ok(Path::new(id).join(ROOTFS_DIR_NAME))
    }

    /// The host path of a container's rootfs as the guest sees it.
    pub fn container_rootfs_path(&self, id: &str) -> Result<PathBuf, SharedDirError> {
        Ok(self.view.join(Self::rootfs_relative_path(id)?))
    }

    /// The ids of the containers currently in the share.
    pub fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock_mounts().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Bind-mounts `source_rootfs` (recursively, `nosuid,nodev`) at
    /// `<id>/rootfs` and returns where the guest's view shows it.
    pub fn add_container(&self, id: &str, source_rootfs: &Path) -> Result<PathBuf, SharedDirError> {
        validate_container_id(id)?;
        let mut mounts = self.lock_mounts();
        if mounts.contains_key(id) {
            return Err(SharedDirError::AlreadyAdded {
                id: id.to_owned(),
                root: self.view.clone(),
            });
        }
        let container_dir = self.host_side.join(id);
        let target = container_dir.join(ROOTFS_DIR_NAME);
        let source = open_source(id, source_rootfs)?;
        let c_id = component(id)?;
        fd::mkdir_at(&self.host_side_fd, &c_id).map_err(io_error(id, "create", &container_dir))?;
        let result = fd::open_path_at(self.host_side_fd.as_raw_fd(), &c_id, libc::O_DIRECTORY)
            .map_err(io_error(id, "open", &container_dir))
            .and_then(|id_fd| {
                let name = component(ROOTFS_DIR_NAME)?;
                fd::mkdir_at(&id_fd, &name).map_err(io_error(id, "create", &target))?;
                let mount_point = fd::open_path_at(id_fd.as_raw_fd(), &name, libc::O_DIRECTORY)
                    .map_err(io_error(id, "open", &target))?;
                let bind = BindRequest {
                    id,
                    source: &source,
                    source_path: source_rootfs,
                    access: Access::ReadWrite,
                    target: &target,
                };
                let rootfs = bind.mount(&id_fd, &name, mount_point)?;
                Ok((id_fd, rootfs))
            });
        match result {
            Ok((dir, rootfs)) => {
                mounts.insert(
                    id.to_owned(),
                    ContainerMounts {
                        dir,
                        binds: vec![rootfs],
                    },
                );
                tracing::info!(container_id = id, "container rootfs added to the share");
                Ok(self.view.join(id).join(ROOTFS_DIR_NAME))
            }
            Err(error) => {
                self.remove_container_dir(id);
                Err(error)
            }
        }
    }

    /// Where volume `index` of a container sits relative to the share root:
    /// `<id>/volumes/<index>`. Inside the container's own directory, so no
    /// other container's id can ever name it.
    pub fn volume_relative_path(id: &str, index: usize) -> Result<PathBuf, SharedDirError> {
        validate_container_id(id)?;
        Ok(Path::new(id).join(VOLUMES_DIR_NAME).join(index.to_string()))
    }

    /// Bind-mounts the host path `source` (mount `index` of a container
    /// already added) into the container's directory: a directory at
    /// `volumes/<index>`, a regular file at `files/<index>-<random>`;
    /// anything else is refused. The source is opened once and that inode
    /// is mounted, `nosuid,nodev`, read-only on the host for
    /// [`Access::ReadOnly`]. Returns the path relative to the share root;
    /// removed with the container.
    pub fn add_bind(
        &self,
        id: &str,
        index: usize,
        source: &Path,
        access: Access,
    ) -> Result<PathBuf, SharedDirError> {
        validate_container_id(id)?;
        let source_fd = open_source(id, source)?;
        let kind = fd::inode_of(&source_fd)
            .map_err(io_error(id, "inspect", source))?
            .kind;
        let (parent, name) = match kind {
            fd::InodeKind::Directory => (VOLUMES_DIR_NAME, index.to_string()),
            fd::InodeKind::RegularFile => {
                let random = fd::random_name().map_err(io_error(id, "name", source))?;
                (FILES_DIR_NAME, format!("{index}-{random}"))
            }
            fd::InodeKind::Other => {
                return Err(SharedDirError::NotShareable {
                    id: id.to_owned(),
                    source_path: source.to_owned(),
                })
            }
        };
        let relative = Path::new(id).join(parent).join(&name);
        let target = self.host_side.join(&relative);
        let mut mounts = self.lock_mounts();
        let entry = mounts.get_mut(id).ok_or_else(|| SharedDirError::NotAdded {
            id: id.to_owned(),
            root: self.view.clone(),
        })?;
        let parent_path = self.host_side.join(id).join(parent);
        let c_parent = component(parent)?;
        match fd::mkdir_at(&entry.dir, &c_parent) {
            Ok(()) => {}
            Err(source) if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(io_error(id, "create", &parent_path)(source)),
        }
        let parent_fd = fd::open_path_at(entry.dir.as_raw_fd(), &c_parent, libc::O_DIRECTORY)
            .map_err(io_error(id, "open", &parent_path))?;
        let c_name = component(&name)?;
        let mount_point = if kind == fd::InodeKind::Directory {
            fd::mkdir_at(&parent_fd, &c_name).map_err(io_error(id, "create", &target))?;
            fd::open_path_at(parent_fd.as_raw_fd(), &c_name, libc::O_DIRECTORY)
        } else {
            fd::create_file_at(&parent_fd, &c_name)
        }
        .map_err(io_error(id, "create", &target))?;
        let bind = BindRequest {
            id,
            source: &source_fd,
            source_path: source,
            access,
            target: &target,
        };
        let mount_root = bind.mount(&parent_fd, &c_name, mount_point)?;
        entry.binds.push(mount_root);
        tracing::info!(container_id = id, index, relative = %relative.display(), ?access, "bind source added to the share");
        Ok(relative)
    }

    /// Unmounts a container's binds and rootfs and removes `<id>`. If
    /// anything fails to unmount, nothing is removed: a removal must never
    /// reach into a host directory.
    pub fn remove_container(&self, id: &str) -> Result<(), SharedDirError> {
        validate_container_id(id)?;
        let entry = self
            .lock_mounts()
            .remove(id)
            .ok_or_else(|| SharedDirError::NotAdded {
                id: id.to_owned(),
                root: self.view.clone(),
            })?;
        let container_dir = self.host_side.join(id);
        // Binds first (they sit beside the rootfs, not in it), rootfs last.
        for bind in entry.binds.iter().rev() {
            fd::detach_fd(bind).map_err(io_error(id, "unmount in", &container_dir))?;
        }
        drop(entry);
        if !super::cleanup::unmount_and_remove(&container_dir) {
            return Err(SharedDirError::Io {
                id: id.to_owned(),
                operation: "remove",
                path: container_dir,
                source: std::io::Error::other("mounts remain or the removal failed"),
            });
        }
        tracing::info!(container_id = id, "container removed from the share");
        Ok(())
    }

    fn lock_mounts(&self) -> MutexGuard<'_, HashMap<String, ContainerMounts>> {
        self.mounts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Best-effort cleanup of a half-made `<id>` after a failed add.
    fn remove_container_dir(&self, id: &str) {
        let container_dir = self.host_side.join(id);
        if !super::cleanup::unmount_and_remove(&container_dir) {
            tracing::warn!(
                container_id = id,
                "cannot clean up a failed container directory"
            );
        }
    }
}

impl Drop for SharedDirectory {
    fn drop(&mut self) {
        for id in self.containers() {
            if let Err(error) = self.remove_container(&id) {
                tracing::warn!(%error, container_id = %id, "cannot remove a container from the share");
            }
        }
        layout::tear_down(&self.sandbox_dir);
    }
}

/// One bind mount to make: `source` (opened already) onto a mount point
/// in the share, for container `id`.
struct BindRequest<'a> {
    id: &'a str,
    source: &'a OwnedFd,
    source_path: &'a Path,
    access: Access,
    /// The host path of the mount point, for messages.
    target: &'a Path,
}

impl BindRequest<'_> {
    /// Mounts the source, restricted, onto `mount_point` (entry `name` of
    /// `parent`), checks that `name` now shows the source, and returns an
    /// `O_PATH` fd on the mount's root.
    fn mount(
        &self,
        parent: &OwnedFd,
        name: &std::ffi::CString,
        mount_point: OwnedFd,
    ) -> Result<OwnedFd, SharedDirError> {
        let id = self.id;
        let mut attrs = fd::MOUNT_ATTR_NOSUID | fd::MOUNT_ATTR_NODEV;
        if self.access == Access::ReadOnly {
            attrs |= fd::MOUNT_ATTR_RDONLY;
        }
        fd::bind_fd_onto_fd(self.source, &mount_point, attrs).map_err(io_error(
            id,
            "bind-mount (nosuid, nodev, ro as asked) onto",
            self.target,
        ))?;
        // Looked up again by name, the mount point now shows the mount's
        // root; keep that fd so the unmount needs no path.
        let mount_root = match fd::open_path_at(parent.as_raw_fd(), name, 0) {
            Ok(fd) => fd,
            Err(error) => {
                detach_quietly(&mount_point);
                return Err(io_error(id, "open", self.target)(error));
            }
        };
        let shows_source = match (fd::inode_of(&mount_root), fd::inode_of(self.source)) {
            (Ok(mounted), Ok(source)) => mounted == source,
            _ => false,
        };
        if !shows_source {
            detach_quietly(&mount_root);
            return Err(SharedDirError::MountMismatch {
                id: id.to_owned(),
                source_path: self.source_path.to_owned(),
                target: self.target.to_owned(),
            });
        }
        Ok(mount_root)
    }
}

/// Whether the guest may write through a mount in the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Read-only on the host itself, not only in the guest's view: the
    /// guest kernel is not trusted to honour a read-only mount.
    ReadOnly,
}

/// Checks that `id` is a containerd identifier (see [`crate::ids`]), so one
/// safe path component.
pub fn validate_container_id(id: &str) -> Result<(), SharedDirError> {
    crate::ids::validate("container id", id).map_err(|invalid| SharedDirError::InvalidContainerId {
        id: id.to_owned(),
        reason: invalid.reason,
    })
}

/// Maps an io::Error of `operation` on `path` for container `id`.
fn io_error<'a>(
    id: &'a str,
    operation: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SharedDirError + 'a {
    move |source| SharedDirError::Io {
        id: id.to_owned(),
        operation,
        path: path.to_owned(),
        source,
    }
}

fn component(name: &str) -> Result<std::ffi::CString, SharedDirError> {
    fd::component(name).map_err(|_| SharedDirError::InvalidContainerId {
        id: name.to_owned(),
        reason: "it is not a single path component",
    })
}

fn open_source(id: &str, source: &Path) -> Result<OwnedFd, SharedDirError> {
    fd::open_source(source).map_err(io_error(id, "open the bind source", source))
}

fn detach_quietly(fd: &OwnedFd) {
    if let Err(error) = fd::detach_fd(fd) {
        tracing::warn!(%error, "cannot undo a bind mount into the share");
    }
}
