//! AF_VSOCK stream sockets for the guest side (the host side of husk's
//! vsock is hybrid, AF_UNIX, and needs none of this). Thin wrappers over
//! `libc` that own their descriptor.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The host's context id.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl VsockStream {
    /// Connects to `port` on context `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = stream_socket()?;
        let addr = address(cid, port);
        loop {
            // SAFETY: addr is a valid sockaddr_vm of the given length.
            let result = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_vm).cast(),
                    size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            match check(result) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(|()| Self { fd }),
            }
        }
    }

    /// Another handle to the same connection (for a sender thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// Ends the sending direction: the peer reads EOF.
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on a descriptor this value owns.
        check(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes of reads.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl VsockListener {
    /// Listens on `port` of every local context id.
    pub fn bind(port: u32, backlog: i32) -> io::Result<Self> {
        let fd = stream_socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: addr is a valid sockaddr_vm of the given length.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) has no memory arguments.
        check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
        Ok(Self { fd })
    }

    /// Waits for one connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: a null address asks accept(2) not to report the peer.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fd is a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(VsockStream { fd });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}
