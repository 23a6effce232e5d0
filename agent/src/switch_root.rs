//! Leaving the initramfs. The kernel starts PID 1 on `rootfs`, the root of
//! the mount tree, which pivot_root(2) refuses to move (EINVAL): no container
//! could then pivot into its own root. So at boot the agent copies the
//! initramfs into a tmpfs, empties the initramfs (its memory is freed), and
//! makes the tmpfs the root with MS_MOVE + chroot — what `switch_root` does
//! in a conventional initrd. Afterwards the root is an ordinary mount and
//! container runtimes can pivot away from it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// Set in the environment of the re-executed agent, so it does not switch
/// roots twice.
const SWITCHED_ENV: &str = "HUSK_AGENT_ROOT_SWITCHED";

/// Where the new root is assembled before it is moved onto `/`.
const STAGING: &str = "/.husk-root";

/// Errors while switching roots; each names the path that failed.
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

/// Copies the initramfs into a tmpfs and makes that the root.
pub fn switch_to_tmpfs_root() -> Result<(), SwitchRootError> {
    let staging = Path::new(STAGING);
    std::fs::create_dir_all(staging).map_err(io_error("create", staging))?;
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(sys_error("mount a tmpfs on", staging))?;
    for entry in std::fs::read_dir("/").map_err(io_error("read", Path::new("/")))? {
        let entry = entry.map_err(io_error("read", Path::new("/")))?;
        let path = entry.path();
        if path == staging {
            continue;
        }
        copy_tree(&path, &staging.join(entry.file_name()))?;
        // Free the initramfs copy at once: it is RAM the guest needs.
        remove_tree(&path)?;
    }
    std::env::set_current_dir(staging).map_err(io_error("enter", staging))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys_error("move onto /", staging))?;
    nix::unistd::chroot(".").map_err(sys_error("chroot into", staging))?;
    std::env::set_current_dir("/").map_err(io_error("enter", Path::new("/")))
}

/// Whether this process is the agent re-executed from the tmpfs root.
/// The marker is removed so no child of the agent inherits it (this runs
/// first thing in `main`, before any thread exists).
pub fn already_switched() -> bool {
    let switched = std::env::var_os(SWITCHED_ENV).is_some();
    std::env::remove_var(SWITCHED_ENV);
    switched
}

/// Re-executes `/init` (now on the tmpfs) as PID 1 with the same arguments,
/// so PID 1 runs from the new root; returns only on failure.
pub fn exec_new_init() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::Command::new("/init")
        .args(args)
        .env(SWITCHED_ENV, "1")
        .exec()
}

fn copy_tree(source: &Path, target: &Path) -> Result<(), SwitchRootError> {
    let metadata = std::fs::symlink_metadata(source).map_err(io_error("inspect", source))?;
    let kind = metadata.file_type();
    if kind.is_dir() {
        std::fs::create_dir(target).map_err(io_error("create", target))?;
        std::fs::set_permissions(
            target,
            std::fs::Permissions::from_mode(metadata.mode() & 0o7777),
        )
        .map_err(io_error("set the mode of", target))?;
        for entry in std::fs::read_dir(source).map_err(io_error("read", source))? {
            let entry = entry.map_err(io_error("read", source))?;
            copy_tree(&entry.path(), &target.join(entry.file_name()))?;
        }
    } else if kind.is_symlink() {
        let link = std::fs::read_link(source).map_err(io_error("read the link", source))?;
        std::os::unix::fs::symlink(&link, target).map_err(io_error("create the link", target))?;
    } else if kind.is_file() {
        std::fs::copy(source, target).map_err(io_error("copy", source))?;
    } else if kind.is_char_device() || kind.is_block_device() {
        let path =
            CString::new(target.as_os_str().as_bytes()).map_err(|_| SwitchRootError::Io {
                action: "name",
                path: target.to_owned(),
                source: std::io::ErrorKind::InvalidInput.into(),
            })?;
        // SAFETY: `path` is a valid NUL-terminated string; mknod has no
        // memory effects.
        if unsafe { libc::mknod(path.as_ptr(), metadata.mode(), metadata.rdev()) } != 0 {
            return Err(io_error("create the device node", target)(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn remove_tree(path: &Path) -> Result<(), SwitchRootError> {
    let metadata = std::fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
    if metadata.is_dir() {
        std::fs::remove_dir_all(path).map_err(io_error("remove", path))
    } else {
        std::fs::remove_file(path).map_err(io_error("remove", path))
    }
}
