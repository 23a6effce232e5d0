//! A private root for the virtio-fs threads (virtiofsd's `--sandbox
//! namespace`, per thread).
//!
//! The calling thread leaves the shim's mount namespace for a copy of its
//! own in which every mount is a slave (host mounts and unmounts still reach
//! it, nothing it does reaches the host) and pivots into a fresh, read-only
//! tmpfs that holds exactly two things:
//!
//! - `/share`: a recursive clone of the pod's share, which stays a slave of
//!   the share's master, so rootfs and volumes the shim mounts later appear;
//! - `/proc/self/fd`: the shim's own fd directory, because fuse-backend-rs
//!   reaches inodes by the absolute path `/proc/self/fd/N` for its xattr
//!   calls. Nothing else of procfs is there (no `/proc/1/root`).
//!
//! The passthrough is then rooted at [`SHARE_INSIDE`]. Everything the thread
//! and the threads it creates could be tricked into resolving by path sees
//! only that. fds opened before the move (the passthrough's `/proc/self/fd`
//! handle, listening sockets) keep working: an fd holds its mount.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::ConfineError;

/// Where the share is inside the private root.
pub const SHARE_INSIDE: &str = "/share";

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Moves the calling thread into a private mount namespace whose root holds
/// only `share` (at [`SHARE_INSIDE`]) and `/proc/self/fd`. Needs
/// CAP_SYS_ADMIN, so it comes before the thread's capabilities are cut.
pub fn enter_private_root(share: &Path) -> Result<(), ConfineError> {
    let failed = |what: &'static str| {
        move |source: std::io::Error| ConfineError::Call {
            class: "fs",
            what,
            source,
        }
    };
    let last_failed = |what: &'static str| failed(what)(std::io::Error::last_os_error());
    let share_c = path_cstring(share)?;
    let holder = share.parent().ok_or_else(|| ConfineError::Call {
        class: "fs",
        what: "find a directory above the share",
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    let holder_c = path_cstring(holder)?;

    // SAFETY: unshare with flags only; a thread may take its own fs context
    // and mount namespace in a multithreaded process.
    if unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) } != 0 {
        return Err(last_failed("unshare the mount namespace"));
    }
    mount(None, c"/", None, libc::MS_REC | libc::MS_SLAVE, None)
        .map_err(failed("make the namespace's mounts slaves"))?;

    // Detached copies of what the root will hold, taken before anything
    // covers them.
    let share_tree =
        open_tree_clone(&share_c, AT_RECURSIVE).map_err(failed("clone the share's mount tree"))?;
    let fd_tree = open_tree_clone(c"/proc/self/fd", 0).map_err(failed("clone /proc/self/fd"))?;

    // The new root: a tmpfs over the share's parent (in this namespace only,
    // over the parent so the clone above is not taken from under it).
    mount(
        Some(c"tmpfs"),
        &holder_c,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=64k,nr_inodes=16,mode=0555"),
    )
    .map_err(failed("mount the private root"))?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::chdir(holder_c.as_ptr()) } != 0 {
        return Err(last_failed("enter the private root"));
    }
    for dir in [c"share", c"proc", c"proc/self", c"proc/self/fd"] {
        // SAFETY: a NUL-terminated relative path.
        if unsafe { libc::mkdir(dir.as_ptr(), 0o555) } != 0 {
            return Err(last_failed("make the private root's directories"));
        }
    }
    move_tree(&share_tree, c"share").map_err(failed("attach the share"))?;
    move_tree(&fd_tree, c"proc/self/fd").map_err(failed("attach /proc/self/fd"))?;

    // pivot_root(".", "."): the old root is stacked on the new one, and
    // detaching "." then removes it.
    // SAFETY: NUL-terminated literals.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
        return Err(last_failed("pivot into the private root"));
    }
    // SAFETY: a NUL-terminated literal.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_failed("detach the old root"));
    }
    // SAFETY: a NUL-terminated literal.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(last_failed("enter /"));
    }
    mount(
        None,
        c"/",
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
    .map_err(failed("make the private root read-only"))?;
    Ok(())
}

fn path_cstring(path: &Path) -> Result<CString, ConfineError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ConfineError::Call {
        class: "fs",
        what: "name the share (the path holds a NUL byte)",
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn mount(
    source: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let or_null = |value: Option<&std::ffi::CStr>| value.map_or(std::ptr::null(), |v| v.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    let ret = unsafe {
        libc::mount(
            or_null(source),
            target.as_ptr(),
            or_null(fstype),
            flags,
            or_null(data).cast(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_tree_clone(path: &std::ffi::CStr, extra: libc::c_uint) -> std::io::Result<OwnedFd> {
    // SAFETY: open_tree with a NUL-terminated path relative to the cwd.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | extra,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of open_tree is a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
}

fn move_tree(tree: &OwnedFd, target: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: move_mount from a valid fd (empty path) to a NUL-terminated
    // path relative to the cwd.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
