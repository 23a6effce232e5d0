//! The system calls the share is built with, each on a directory fd and one
//! path component, never on a path: `openat` with `O_NOFOLLOW`, `mkdirat`,
//! exclusive file creation, bind mounts from one fd onto another
//! (restricted before they are attached), bind remounts and detaching
//! unmounts. A symlink or a swapped directory at any
//! component makes the call fail; it is never followed.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Mode of the directories created in the share: the guest reads them.
pub const DIR_MODE: libc::mode_t = 0o755;
/// Mode of the empty files that file bind mounts are made onto.
pub const MOUNT_POINT_FILE_MODE: libc::mode_t = 0o600;

/// What kind of inode an fd refers to, as far as the share cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeKind {
    Directory,
    RegularFile,
    /// Anything else: a device node, FIFO, socket or symlink.
    Other,
}

/// Device and inode number of an fd, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InodeId {
    pub dev: u64,
    pub ino: u64,
    pub kind: InodeKind,
}

/// A NUL-terminated copy of a path.
pub fn path_cstring(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })
}

/// A NUL-terminated single path component (no `/`, not `.` or `..`).
pub fn component(name: &str) -> std::io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    CString::new(name).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "name contains a NUL byte")
    })
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC | extra)`.
pub fn open_path_at(
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

/// Opens a host path given by the container's spec (a bind source) as an
/// `O_PATH` fd, following symlinks as runc does: from here on the share
/// works on the inode this fd names, whatever happens to the path.
pub fn open_source(path: &Path) -> std::io::Result<OwnedFd> {
    let c_path = path_cstring(path)?;
    // SAFETY: `c_path` is NUL-terminated.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat` of an fd (works on `O_PATH` fds).
pub fn inode_of(fd: &OwnedFd) -> std::io::Result<InodeId> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid, writable stat buffer for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let kind = match stat.st_mode & libc::S_IFMT {
        libc::S_IFDIR => InodeKind::Directory,
        libc::S_IFREG => InodeKind::RegularFile,
        _ => InodeKind::Other,
    };
    Ok(InodeId {
        dev: stat.st_dev,
        ino: stat.st_ino,
        kind,
    })
}

/// `mkdirat(dir, name, DIR_MODE)`; an existing entry (even a symlink) fails.
pub fn mkdir_at(dir: &OwnedFd, name: &CString) -> std::io::Result<()> {
    // SAFETY: `name` is NUL-terminated; mkdirat never follows a final symlink.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), DIR_MODE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the empty regular file `name` in `dir` (`O_CREAT | O_EXCL`, so
/// an existing entry or a symlink planted there fails) and returns an
/// `O_PATH` fd on it.
pub fn create_file_at(dir: &OwnedFd, name: &CString) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; O_EXCL | O_NOFOLLOW make the call
    // fail on any existing entry, symlinks included.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
            MOUNT_POINT_FILE_MODE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat; closing it is its only use.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    open_path_at(dir.as_raw_fd(), name, 0)
}

/// The `/proc/self/fd/N` path that names exactly the inode behind `fd`.
pub fn fd_path(fd: &OwnedFd) -> CString {
    // Digits only: never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn mount_raw(
    source: Option<&CString>,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
    data: Option<&CString>,
) -> std::io::Result<()> {
    let ptr = |s: Option<&CString>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    let ret = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `MOUNT_ATTR_RDONLY` (linux/mount.h).
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// `struct mount_attr` (linux/mount.h, `MOUNT_ATTR_SIZE_VER0`).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn syscall_fd(ret: libc::c_long) -> std::io::Result<OwnedFd> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of open_tree is a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
}

fn syscall_ok(ret: libc::c_long) -> std::io::Result<()> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bind-mounts (recursively) the inode behind `source` onto the inode
/// behind `target`, both named by fd, with the mount attributes `attrs`
/// (`MOUNT_ATTR_*`) set on the whole tree *before* it is attached: the
/// copy made from a detached clone (`open_tree`), restricted
/// (`mount_setattr`), then moved into place (`move_mount`). Mounts that
/// propagate from the target's parent (the guest's read-only view) are
/// copies of the restricted tree, so no view of it is ever less
/// restricted; a remount after the fact would not propagate.
pub fn bind_fd_onto_fd(source: &OwnedFd, target: &OwnedFd, attrs: u64) -> std::io::Result<()> {
    let empty = c"";
    // SAFETY: open_tree on a valid fd with an empty NUL-terminated path.
    let tree = syscall_fd(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | AT_RECURSIVE
                | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    })?;
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `attr` is a valid mount_attr of the size passed; the path is
    // empty and NUL-terminated.
    syscall_ok(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    // SAFETY: move_mount between two valid fds with empty paths.
    syscall_ok(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
}

/// Bind-mounts the directory `source` onto `target` (not recursively).
pub fn bind_path(source: &Path, target: &Path) -> std::io::Result<()> {
    mount_raw(
        Some(&path_cstring(source)?),
        &path_cstring(target)?,
        None,
        libc::MS_BIND,
        None,
    )
}

/// Mounts a tmpfs on `target` with the given mount flags and options.
pub fn mount_tmpfs(target: &Path, flags: libc::c_ulong, options: &str) -> std::io::Result<()> {
    let fstype = CString::new("tmpfs").unwrap_or_default();
    let data = CString::new(options).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "options contain NUL")
    })?;
    mount_raw(
        Some(&fstype),
        &path_cstring(target)?,
        Some(&fstype),
        flags,
        Some(&data),
    )
}

/// Changes the propagation type of the mount at `target` (`MS_PRIVATE`,
/// `MS_SHARED` or `MS_SLAVE`).
pub fn set_propagation(target: &Path, propagation: libc::c_ulong) -> std::io::Result<()> {
    mount_raw(None, &path_cstring(target)?, None, propagation, None)
}

/// Bind-remounts the mount whose root `target` names with `flags` added to
/// `MS_BIND | MS_REMOUNT` (`MS_RDONLY`, `MS_NOSUID`, ...).
pub fn remount_bind(target: &CString, flags: libc::c_ulong) -> std::io::Result<()> {
    mount_raw(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// Detaches the mount at the path `target`, without following a final
/// symlink.
pub fn detach(target: &CString) -> std::io::Result<()> {
    umount_detach(target, libc::UMOUNT_NOFOLLOW)
}

/// Detaches the mount whose root `fd` is on, through `/proc/self/fd/N`
/// (a magic link the kernel resolves to exactly that mount, so it is
/// followed on purpose).
pub fn detach_fd(fd: &OwnedFd) -> std::io::Result<()> {
    umount_detach(&fd_path(fd), 0)
}

fn umount_detach(target: &CString, extra_flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `target` is NUL-terminated. MNT_DETACH: the guest may still
    // hold files open below it; they keep the detached tree alive.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | extra_flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// 64 random bits from the kernel, as 16 hex digits: names a guest cannot
/// predict.
pub fn random_name() -> std::io::Result<String> {
    let mut bytes = [0u8; 8];
    crate::random::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    //! These run without root: they check that no helper follows a
    //! symlink, including one a racing thread keeps swapping in.
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn open_dir(path: &Path) -> OwnedFd {
        open_path_at(
            libc::AT_FDCWD,
            &path_cstring(path).unwrap(),
            libc::O_DIRECTORY,
        )
        .unwrap()
    }

    #[test]
    fn components_that_would_leave_the_directory_are_refused() {
        for name in ["", ".", "..", "a/b", "/abs"] {
            assert!(component(name).is_err(), "{name:?} accepted");
        }
        assert!(component("nul\0").is_err());
        assert!(component("c1").is_ok());
    }

    #[test]
    fn a_planted_symlink_is_neither_opened_nor_replaced_nor_written_through() {
        let base = tempfile::tempdir().unwrap();
        let share = base.path().join("share");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("c1")).unwrap();
        std::os::unix::fs::symlink(outside.join("file"), share.join("f")).unwrap();
        let dir = open_dir(&share);
        let c1 = component("c1").unwrap();
        assert!(open_path_at(dir.as_raw_fd(), &c1, libc::O_DIRECTORY).is_err());
        assert!(mkdir_at(&dir, &c1).is_err());
        assert!(create_file_at(&dir, &component("f").unwrap()).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn a_thread_swapping_symlinks_in_a_loop_never_gets_anything_created_outside() {
        let base = tempfile::tempdir().unwrap();
        let share = base.path().join("share");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swaps_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let swapper = {
            let (share, outside, stop) = (share.clone(), outside.clone(), stop.clone());
            let swaps_done = swaps_done.clone();
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for name in ["c", "files", "f"] {
                        let entry = share.join(name);
                        let _ = std::fs::remove_dir_all(&entry);
                        let _ = std::fs::remove_file(&entry);
                        let _ = std::os::unix::fs::symlink(&outside, &entry);
                    }
                    swaps += 1;
                    swaps_done.store(swaps, Ordering::Relaxed);
                }
                swaps
            })
        };
        let dir = open_dir(&share);
        let (mut made, mut refused) = (0u32, 0u32);
        // At least 2,000 rounds, and on until the swapper has raced us for
        // 200 swaps (a bound keeps a starved thread from hanging the test).
        let mut rounds = 0u64;
        while rounds < 2000 || (swaps_done.load(Ordering::Relaxed) < 200 && rounds < 5_000_000) {
            rounds += 1;
            let c = component("c").unwrap();
            match mkdir_at(&dir, &c)
                .and_then(|()| open_path_at(dir.as_raw_fd(), &c, libc::O_DIRECTORY))
            {
                Ok(fd) => {
                    // Whatever we hold is a real directory inside the share.
                    assert_eq!(inode_of(&fd).unwrap().kind, InodeKind::Directory);
                    made += 1;
                }
                Err(_) => refused += 1,
            }
            if create_file_at(&dir, &component("f").unwrap()).is_ok() {
                made += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 0, "the swapping thread never ran");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "something was created through a symlink ({made} made, {refused} refused, {swaps} swaps)"
        );
    }

    #[test]
    fn random_names_differ_and_are_hex() {
        let (a, b) = (random_name().unwrap(), random_name().unwrap());
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn inode_kinds_are_read_from_the_fd() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("file"), b"x").unwrap();
        assert_eq!(
            inode_of(&open_source(base.path()).unwrap()).unwrap().kind,
            InodeKind::Directory
        );
        assert_eq!(
            inode_of(&open_source(&base.path().join("file")).unwrap())
                .unwrap()
                .kind,
            InodeKind::RegularFile
        );
        assert_eq!(
            inode_of(&open_source(Path::new("/dev/null")).unwrap())
                .unwrap()
                .kind,
            InodeKind::Other
        );
    }
}
