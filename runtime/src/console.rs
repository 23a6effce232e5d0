//! Terminals: the container side creates a pty inside the container's own
//! devpts and sends the master over the console socket (SCM_RIGHTS), the
//! protocol runc uses with `--console-socket`; the slave becomes the
//! process's stdio and controlling terminal. The receiving side is here too,
//! for `run` with a terminal and tests.

use crate::error::{sys, Context, Error, Result};
use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Connect to a console socket given on the command line.
pub fn connect(path: &Path) -> Result<OwnedFd> {
    let s = UnixStream::connect(path).at("connect console socket", path)?;
    Ok(OwnedFd::from(s))
}

/// Create the pty, send its master over `socket`, and make the slave the
/// caller's stdio and controlling terminal. Returns the slave's path.
pub fn setup_pty(socket: RawFd, width: u64, height: u64) -> Result<PathBuf> {
    let master = sys(
        posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC),
        "open",
        "/dev/ptmx",
    )?;
    sys(grantpt(&master), "grantpt", "/dev/ptmx")?;
    sys(unlockpt(&master), "unlockpt", "/dev/ptmx")?;
    let slave_name = sys(ptsname_r(&master), "ptsname", "/dev/ptmx")?;
    let slave = nix::fcntl::open(
        slave_name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .at("open", &slave_name)?;
    if width > 0 || height > 0 {
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a valid winsize on an open tty.
        unsafe { libc::ioctl(slave, libc::TIOCSWINSZ, &ws) };
    }
    send_fd(socket, master.as_raw_fd(), "/dev/ptmx")?;
    drop(master);
    for target in 0..3 {
        sys(nix::unistd::dup2(slave, target), "dup2", &slave_name)?;
    }
    if slave > 2 {
        let _ = nix::unistd::close(slave);
    }
    // SAFETY: TIOCSCTTY on our stdin, which is the new tty.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return sys(
            Err(nix::errno::Errno::last()),
            "set controlling terminal",
            &slave_name,
        );
    }
    Ok(PathBuf::from(slave_name))
}

/// Send `fd` over the unix socket `socket` with `name` as payload.
pub fn send_fd(socket: RawFd, fd: RawFd, name: &str) -> Result<()> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(name.as_bytes())];
    sys(
        sendmsg::<()>(socket, &iov, &cmsg, MsgFlags::empty(), None),
        "send terminal",
        "console socket",
    )?;
    Ok(())
}

/// Receive one descriptor sent with [`send_fd`].
pub fn recv_fd(socket: RawFd) -> Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = sys(
        recvmsg::<()>(socket, &mut iov, Some(&mut space), MsgFlags::empty()),
        "receive terminal",
        "console socket",
    )?;
    for c in msg
        .cmsgs()
        .map_err(|e| Error::Init(format!("console socket: {e}")))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(Error::Init("console socket: no descriptor received".into()))
}

/// Copy between our stdin/stdout and a pty master until the slave closes.
pub fn proxy(master: &OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::BorrowedFd;
    let mut buf = [0u8; 8192];
    let mut stdin_open = true;
    loop {
        // SAFETY: fd 0 stays open for the life of the process.
        let stdin = unsafe { BorrowedFd::borrow_raw(0) };
        let mut fds = vec![PollFd::new(master.as_fd_ref(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let m_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        let s_ev = if stdin_open {
            fds[1].revents().unwrap_or(PollFlags::empty())
        } else {
            PollFlags::empty()
        };
        if m_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let _ = write_all(1, &buf[..n]);
                }
            }
        }
        if s_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
            match nix::unistd::read(0, &mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let _ = write_all(master.as_raw_fd(), &buf[..n]);
                }
            }
        }
    }
}

trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        // SAFETY: fd is open for the duration of the call.
        let n = nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, data)?;
        data = &data[n..];
    }
    Ok(())
}
