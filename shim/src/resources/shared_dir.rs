//! Host-side management of the shared directory while the guest runs.
//!
//! The shim shares one directory per pod; each container's rootfs appears
//! in it as `<shared_dir>/<container id>/rootfs`, a bind mount of the
//! bundle's rootfs that the agent finds under the virtio-fs mount.
//!
//! The guest can write to the share, so everything here treats the tree
//! below the root as hostile: directories are created and opened relative
//! to an `O_PATH` fd of the root with `O_NOFOLLOW`, the bind mount targets
//! the directory through its own fd (`/proc/self/fd/N`), never through a
//! path a guest could swap for a symlink, and each mount is remembered by an
//! fd on its root so `remove_container` unmounts exactly what it mounted,
//! wherever the guest may have renamed its parent to.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Longest container id accepted: containerd's identifier limit
/// (`pkg/identifiers`, maxLength = 76).
pub const CONTAINER_ID_MAX_LEN: usize = 76;
/// The directory under `<shared_dir>/<id>` where the rootfs is mounted.
pub const ROOTFS_DIR_NAME: &str = "rootfs";
/// The directory under `<shared_dir>/<id>` holding the container's volumes
/// (host directories it bind-mounts), one numbered directory each.
pub const VOLUMES_DIR_NAME: &str = "volumes";
/// Mode of the directories this module creates: the guest reads them as root.
const CONTAINER_DIR_MODE: libc::mode_t = 0o755;

/// Why a container directory could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum SharedDirError {
    /// The container id is unusable as a single path component.
    #[error("invalid container id {id:?}: {reason}")]
    InvalidContainerId { id: String, reason: &'static str },
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
        "the bind mount of {source_rootfs} at {target} for container {id} does not show the source"
    )]
    MountMismatch {
        id: String,
        source_rootfs: PathBuf,
        target: PathBuf,
    },
}

/// The shared directory of one pod and the container rootfs mounts in it.
pub struct SharedDirectory {
    root: PathBuf,
    root_fd: OwnedFd,
    /// What this share mounted for each container.
    mounts: Mutex<HashMap<String, ContainerMounts>>,
}

/// The mounts of one container in the share, each remembered by an
/// `O_PATH` fd on its root so unmounting needs no path.
struct ContainerMounts {
    /// `<shared_dir>/<id>`.
    dir: OwnedFd,
    rootfs: OwnedFd,
    volumes: Vec<OwnedFd>,
}

impl SharedDirectory {
    /// Opens the shared directory `root`, which must exist.
    pub fn open(root: &Path) -> Result<Self, SharedDirError> {
        let c_root = path_to_cstring(root).map_err(|source| SharedDirError::OpenRoot {
            path: root.to_owned(),
            source,
        })?;
        let root_fd =
            open_path_fd(libc::AT_FDCWD, &c_root, libc::O_DIRECTORY).map_err(|source| {
                SharedDirError::OpenRoot {
                    path: root.to_owned(),
                    source,
                }
            })?;
        Ok(Self {
            root: root.to_owned(),
            root_fd,
            mounts: Mutex::new(HashMap::new()),
        })
    }

    /// The host path of the share.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a container's rootfs sits relative to the share root (and so
    /// relative to the guest's mount point): `<id>/rootfs`.
    pub fn rootfs_relative_path(id: &str) -> Result<PathBuf, SharedDirError> {
        validate_container_id(id)?;
        Ok(Path::new(id).join(ROOTFS_DIR_NAME))
    }

    /// The host path of a container's rootfs mount.
    pub fn container_rootfs_path(&self, id: &str) -> Result<PathBuf, SharedDirError> {
        Ok(self.root.join(Self::rootfs_relative_path(id)?))
    }

    /// The ids of the containers currently in the share.
    pub fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock_mounts().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Bind-mounts `source_rootfs` (recursively, `nosuid,nodev`) at
    /// `<shared_dir>/<id>/rootfs` and returns that path. `<id>` must not exist yet: a directory the
    /// guest created ahead of the shim is refused, not reused.
    pub fn add_container(&self, id: &str, source_rootfs: &Path) -> Result<PathBuf, SharedDirError> {
        validate_container_id(id)?;
        let mut mounts = self.lock_mounts();
        if mounts.contains_key(id) {
            return Err(SharedDirError::AlreadyAdded {
                id: id.to_owned(),
                root: self.root.clone(),
            });
        }
        let container_dir = self.root.join(id);
        let target = container_dir.join(ROOTFS_DIR_NAME);
        let c_id = component_cstring(id)?;
        mkdir_at(&self.root_fd, &c_id).map_err(io_error(id, "create", &container_dir))?;
        let result = open_path_fd(self.root_fd.as_raw_fd(), &c_id, libc::O_DIRECTORY)
            .map_err(io_error(id, "open", &container_dir))
            .and_then(|id_fd| {
                mkdir_at(&id_fd, &component_cstring(ROOTFS_DIR_NAME)?)
                    .map_err(io_error(id, "create", &target))?;
                let rootfs = mount_at(
                    &id_fd,
                    ROOTFS_DIR_NAME,
                    source_rootfs,
                    Access::ReadWrite,
                    id,
                    &target,
                )?;
                Ok((id_fd, rootfs))
            });
        match result {
            Ok((dir, rootfs)) => {
                mounts.insert(
                    id.to_owned(),
                    ContainerMounts {
                        dir,
                        rootfs,
                        volumes: Vec::new(),
                    },
                );
                tracing::info!(container_id = id, target = %target.display(), "container rootfs added to the share");
                Ok(target)
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

    /// Bind-mounts the host directory `source` (recursively) at
    /// `<shared_dir>/<id>/volumes/<index>` of a container already added,
    /// `nosuid,nodev` and read-only on the host for [`Access::ReadOnly`],
    /// and returns that path relative to the share root. Removed with the
    /// container.
    pub fn add_volume(
        &self,
        id: &str,
        index: usize,
        source: &Path,
        access: Access,
    ) -> Result<PathBuf, SharedDirError> {
        let relative = Self::volume_relative_path(id, index)?;
        let target = self.root.join(&relative);
        let mut mounts = self.lock_mounts();
        let entry = mounts.get_mut(id).ok_or_else(|| SharedDirError::NotAdded {
            id: id.to_owned(),
            root: self.root.clone(),
        })?;
        let volumes_path = self.root.join(id).join(VOLUMES_DIR_NAME);
        let c_volumes = component_cstring(VOLUMES_DIR_NAME)?;
        match mkdir_at(&entry.dir, &c_volumes) {
            Ok(()) => {}
            Err(source) if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(io_error(id, "create", &volumes_path)(source)),
        }
        let volumes_fd = open_path_fd(entry.dir.as_raw_fd(), &c_volumes, libc::O_DIRECTORY)
            .map_err(io_error(id, "open", &volumes_path))?;
        let name = index.to_string();
        mkdir_at(&volumes_fd, &component_cstring(&name)?)
            .map_err(io_error(id, "create", &target))?;
        let mount_root = mount_at(&volumes_fd, &name, source, access, id, &target)?;
        entry.volumes.push(mount_root);
        tracing::info!(container_id = id, target = %target.display(), "volume added to the share");
        Ok(relative)
    }

    /// Unmounts a container's volumes and rootfs and removes
    /// `<shared_dir>/<id>`. If anything fails to unmount, nothing is
    /// removed: a removal must never reach into a host directory.
    pub fn remove_container(&self, id: &str) -> Result<(), SharedDirError> {
        validate_container_id(id)?;
        let entry = self
            .lock_mounts()
            .remove(id)
            .ok_or_else(|| SharedDirError::NotAdded {
                id: id.to_owned(),
                root: self.root.clone(),
            })?;
        let target = self.root.join(id).join(ROOTFS_DIR_NAME);
        for (index, volume) in entry.volumes.iter().enumerate() {
            unmount(volume).map_err(|source| SharedDirError::Io {
                id: id.to_owned(),
                operation: "unmount",
                path: self
                    .root
                    .join(id)
                    .join(VOLUMES_DIR_NAME)
                    .join(index.to_string()),
                source,
            })?;
        }
        unmount(&entry.rootfs).map_err(|source| SharedDirError::Io {
            id: id.to_owned(),
            operation: "unmount",
            path: target.clone(),
            source,
        })?;
        drop(entry);
        // Only the now-empty mount point may go with rmdir: if anything is
        // still mounted there, rmdir fails with EBUSY and nothing below it
        // is touched.
        let container_dir = self.root.join(id);
        if let Ok(id_fd) = open_path_fd(
            self.root_fd.as_raw_fd(),
            &component_cstring(id)?,
            libc::O_DIRECTORY,
        ) {
            let c_rootfs = component_cstring(ROOTFS_DIR_NAME)?;
            if let Err(source) = rmdir_at(&id_fd, &c_rootfs) {
                if source.kind() != std::io::ErrorKind::NotFound {
                    return Err(SharedDirError::Io {
                        id: id.to_owned(),
                        operation: "remove",
                        path: target,
                        source,
                    });
                }
            }
        }
        // Whatever else the guest left in <id> goes too; std's
        // remove_dir_all does not follow symlinks.
        match std::fs::remove_dir_all(&container_dir) {
            Ok(()) => {}
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SharedDirError::Io {
                    id: id.to_owned(),
                    operation: "remove",
                    path: container_dir,
                    source,
                })
            }
        }
        tracing::info!(container_id = id, "container rootfs removed from the share");
        Ok(())
    }

    fn lock_mounts(&self) -> MutexGuard<'_, HashMap<String, ContainerMounts>> {
        self.mounts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Best-effort cleanup of a half-made `<id>` after a failed add.
    fn remove_container_dir(&self, id: &str) {
        let container_dir = self.root.join(id);
        if let Err(error) = std::fs::remove_dir_all(&container_dir) {
            tracing::warn!(%error, container_id = id, "cannot clean up a failed container directory");
        }
    }
}

impl Drop for SharedDirectory {
    fn drop(&mut self) {
        let ids = self.containers();
        for id in ids {
            if let Err(error) = self.remove_container(&id) {
                tracing::warn!(%error, container_id = %id, "cannot remove a container from the share");
            }
        }
    }
}

/// Checks that `id` is one safe path component: 1..=76 bytes of
/// `[A-Za-z0-9._-]`, not `.` or `..` (containerd's identifier rules, which
/// also exclude `/` and NUL).
pub fn validate_container_id(id: &str) -> Result<(), SharedDirError> {
    let invalid = |reason| SharedDirError::InvalidContainerId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > CONTAINER_ID_MAX_LEN {
        return Err(invalid("it is longer than 76 bytes"));
    }
    if id == "." || id == ".." {
        return Err(invalid("it names the current or parent directory"));
    }
    if id.contains('/') {
        return Err(invalid("it contains '/'"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "it may only contain letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
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

/// Bind-mounts `source` onto the existing directory `name` inside `dir_fd`
/// (through the mount point's own fd, never a path), checks that the mount
/// shows the source, and returns an `O_PATH` fd on the mount's root.
fn mount_at(
    dir_fd: &OwnedFd,
    name: &str,
    source: &Path,
    access: Access,
    id: &str,
    target: &Path,
) -> Result<OwnedFd, SharedDirError> {
    let c_name = component_cstring(name)?;
    let c_source = path_to_cstring(source).map_err(io_error(id, "resolve", source))?;
    let mount_point = open_path_fd(dir_fd.as_raw_fd(), &c_name, libc::O_DIRECTORY)
        .map_err(io_error(id, "open", target))?;
    bind_mount(&c_source, &mount_point).map_err(io_error(id, "bind-mount onto", target))?;
    // Looked up again by name, the mount point now shows the mount's root;
    // keep that fd so the unmount needs no path.
    let mount_root = match open_path_fd(dir_fd.as_raw_fd(), &c_name, libc::O_DIRECTORY) {
        Ok(fd) => fd,
        Err(error) => {
            detach_mount(&mount_point);
            return Err(io_error(id, "open", target)(error));
        }
    };
    if !same_inode(&mount_root, source) {
        detach_mount(&mount_root);
        return Err(SharedDirError::MountMismatch {
            id: id.to_owned(),
            source_rootfs: source.to_owned(),
            target: target.to_owned(),
        });
    }
    if let Err(error) = restrict_mount(&mount_root, access) {
        detach_mount(&mount_root);
        return Err(io_error(
            id,
            "restrict (nosuid, nodev, ro) the mount at",
            target,
        )(error));
    }
    Ok(mount_root)
}

/// Whether the guest may write through a mount in the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Read-only on the host itself, not only in the guest's view: the
    /// guest kernel is not trusted to honour a read-only mount.
    ReadOnly,
}

/// Remounts the bind mount whose root is `mount_root` `nosuid,nodev`
/// (and `ro` for [`Access::ReadOnly`]): nothing the guest writes into the
/// share can become a setuid program or a device node on the host.
fn restrict_mount(mount_root: &OwnedFd, access: Access) -> std::io::Result<()> {
    let target = fd_path(mount_root);
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if access == Access::ReadOnly {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: `target` is NUL-terminated; a bind remount takes no source,
    // file system type or data.
    let ret = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn component_cstring(name: &str) -> Result<CString, SharedDirError> {
    CString::new(name).map_err(|_| SharedDirError::InvalidContainerId {
        id: name.to_owned(),
        reason: "it contains a NUL byte",
    })
}

fn path_to_cstring(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC | extra)`.
fn open_path_fd(
    dir: libc::c_int,
    name: &CString,
    extra_flags: libc::c_int,
) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; openat does not touch other memory.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra_flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir_at(dir: &OwnedFd, name: &CString) -> std::io::Result<()> {
    // SAFETY: `name` is NUL-terminated; mkdirat creates no symlink-following path.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), CONTAINER_DIR_MODE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn rmdir_at(dir: &OwnedFd, name: &CString) -> std::io::Result<()> {
    // SAFETY: `name` is NUL-terminated; unlinkat does not follow a final symlink.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `/proc/self/fd/N` path that names exactly the inode behind `fd`.
fn fd_path(fd: &OwnedFd) -> CString {
    // Digits only: never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn bind_mount(source: &CString, target: &OwnedFd) -> std::io::Result<()> {
    let target = fd_path(target);
    // SAFETY: both strings are NUL-terminated; no data argument for a bind.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(mount_root: &OwnedFd) -> std::io::Result<()> {
    let target = fd_path(mount_root);
    // SAFETY: `target` is NUL-terminated. MNT_DETACH: the guest may still
    // hold files open in the rootfs; they keep the detached tree alive.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn detach_mount(fd: &OwnedFd) {
    if let Err(error) = unmount(fd) {
        tracing::warn!(%error, "cannot undo a container rootfs bind mount");
    }
}

/// Whether `fd` is the same inode as `path` (device and inode number).
fn same_inode(fd: &OwnedFd, path: &Path) -> bool {
    let Ok(duplicate) = fd.try_clone() else {
        return false;
    };
    let file = File::from(duplicate);
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(mounted), Ok(source)) => mounted.dev() == source.dev() && mounted.ino() == source.ino(),
        _ => false,
    }
}
