//! Finding the connections a vhost-user server accepted.
//!
//! `vhost-user-backend` owns the accepted frontend socket and offers no way to
//! end a session from the backend's side, so a server that must stop while
//! QEMU is still connected looks the connection up among this process's fds
//! (by its local address, the server's socket path) and shuts it down.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The process's fd directory (`/proc/self/fd`), opened while the server
/// thread may still open files: a confined device thread lists it through
/// this fd (getdents64) and opens nothing.
pub(super) struct FdDirectory(OwnedFd);

impl FdDirectory {
    pub(super) fn open() -> std::io::Result<Self> {
        // SAFETY: a NUL-terminated literal path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/proc/self/fd".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The numbers of the process's open fds now.
    fn numbers(&self) -> Vec<RawFd> {
        let raw = self.0.as_raw_fd();
        let mut numbers = Vec::new();
        // SAFETY: lseek on an fd we own; rewinding makes the next getdents64
        // list the directory afresh.
        if unsafe { libc::lseek(raw, 0, libc::SEEK_SET) } < 0 {
            return numbers;
        }
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: getdents64 writes at most `buffer.len()` bytes.
            let filled = unsafe {
                libc::syscall(libc::SYS_getdents64, raw, buffer.as_mut_ptr(), buffer.len())
            };
            if filled <= 0 {
                return numbers;
            }
            let mut offset = 0usize;
            while offset + 19 <= filled as usize {
                // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8
                // type, then the NUL-terminated name at byte 19.
                let record_len =
                    u16::from_ne_bytes([buffer[offset + 16], buffer[offset + 17]]) as usize;
                if record_len == 0 {
                    return numbers;
                }
                let name = &buffer[offset + 19..(offset + record_len).min(filled as usize)];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if let Some(number) = std::str::from_utf8(name)
                    .ok()
                    .and_then(|text| text.parse::<RawFd>().ok())
                {
                    numbers.push(number);
                }
                offset += record_len;
            }
        }
    }
}

/// Duplicates every connected (not listening) AF_UNIX socket of this process
/// whose local address is `socket_path`. The check runs on the duplicate, so
/// a number reused between the scan and the dup cannot be mistaken for a
/// connection.
pub(super) fn accepted_connections(fds: &FdDirectory, socket_path: &Path) -> Vec<OwnedFd> {
    let mut found = Vec::new();
    for fd in fds.numbers() {
        if fd == fds.0.as_raw_fd() {
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a closed or foreign number
        // fails with EBADF or yields a new fd we own and check below.
        let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if duplicate < 0 {
            continue;
        }
        // SAFETY: `duplicate` is a fresh fd that nothing else owns.
        let duplicate = unsafe { OwnedFd::from_raw_fd(duplicate) };
        if is_connection_on(&duplicate, socket_path) {
            found.push(duplicate);
        }
    }
    found
}

/// Whether `fd` is a connected AF_UNIX socket bound to `socket_path`.
fn is_connection_on(fd: &OwnedFd, socket_path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let raw = fd.as_raw_fd();
    let mut accepting: libc::c_int = 0;
    let mut option_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `option_len` bytes into `accepting`.
    let ret = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut option_len,
        )
    };
    if ret != 0 || accepting != 0 {
        return false;
    }
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut address_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `address_len` bytes into `address`.
    let ret = unsafe {
        libc::getsockname(
            raw,
            (&mut address as *mut libc::sockaddr_un).cast(),
            &mut address_len,
        )
    };
    if ret != 0 || i32::from(address.sun_family) != libc::AF_UNIX {
        return false;
    }
    let path_len = (address_len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let path: Vec<u8> = address.sun_path[..path_len.min(address.sun_path.len())]
        .iter()
        .map(|byte| *byte as u8)
        .take_while(|byte| *byte != 0)
        .collect();
    path == socket_path.as_os_str().as_bytes()
}
