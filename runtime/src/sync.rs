//! The message channel between the runtime and the container's init stages:
//! a `SOCK_SEQPACKET` socketpair carrying one JSON message per packet.
//!
//! Packets keep message boundaries, so neither side needs framing, and a
//! closed peer reads as end-of-file, which is how the runtime learns that an
//! exec succeeded (the socket is close-on-exec) or that the init died.

use crate::error::{sys, Error, Result};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};

/// Largest message: error texts are the biggest payload.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What the stages tell each other.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Message {
    /// Runtime → stage 1: the process is in its cgroups; go on.
    Go,
    /// Stage 1 → runtime: the new user namespace exists; write the maps.
    UsernsReady,
    /// Runtime → stage 1: uid/gid maps are written.
    MapsDone,
    /// Stage 1 → runtime: the container process's pid.
    Stage2Pid(i32),
    /// Stage 2 → runtime: mounts are done; run the createRuntime hooks.
    RunCreateRuntimeHooks,
    /// Runtime → stage 2: createRuntime hooks are done; the OCI state JSON
    /// for the hooks stage 2 runs itself (createContainer sees "creating",
    /// startContainer "created", as with runc).
    HooksDone { creating: String, created: String },
    /// Stage 2 → runtime: set up and waiting for `start`.
    Ready,
    /// Either way: a failure, with its message.
    Error(String),
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A connected pair: (runtime end, child end).
pub fn channel_pair() -> Result<(Channel, Channel)> {
    let (a, b) = sys(
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
        "socketpair",
        "init channel",
    )?;
    Ok((Channel { fd: a }, Channel { fd: b }))
}

impl Channel {
    /// Send one message.
    pub fn send(&self, msg: &Message) -> Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(|e| Error::Init(e.to_string()))?;
        sys(
            send(self.fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL),
            "send",
            "init channel",
        )?;
        Ok(())
    }

    /// Receive one message; `None` when the peer closed its end.
    pub fn recv(&self) -> Result<Option<Message>> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
        loop {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    return serde_json::from_slice(&buf[..n])
                        .map(Some)
                        .map_err(|e| Error::Init(format!("bad message from init: {e}")))
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return sys(Err(e), "recv", "init channel"),
            }
        }
    }

    /// Receive, treating end-of-file and [`Message::Error`] as failures.
    pub fn expect(&self, what: &str) -> Result<Message> {
        match self.recv()? {
            None => Err(Error::Init(format!("container init exited before {what}"))),
            Some(Message::Error(e)) => Err(Error::Init(e)),
            Some(m) => Ok(m),
        }
    }

    /// The raw descriptor (kept open across the fork).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl Channel {
    /// Wrap an already connected descriptor.
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_the_pair_and_close_reads_as_none() {
        let (a, b) = channel_pair().unwrap();
        a.send(&Message::Stage2Pid(42)).unwrap();
        assert_eq!(b.recv().unwrap(), Some(Message::Stage2Pid(42)));
        b.send(&Message::Error("boom".into())).unwrap();
        assert!(a.expect("ready").unwrap_err().to_string().contains("boom"));
        drop(b);
        assert_eq!(a.recv().unwrap(), None);
    }
}
