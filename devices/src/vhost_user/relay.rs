//! A relay between a frontend and its daemon that answers the
//! `SET_VRING_ENABLE` requests a frontend sends before it acked
//! `VHOST_USER_F_PROTOCOL_FEATURES`, and replays them to the daemon once
//! that feature is acked.
//!
//! The vhost-user specification allows `SET_VRING_ENABLE` only once that
//! feature was negotiated, and the `vhost` crate's request handler enforces
//! it: an early request is an error that ends the daemon's request loop, so
//! the session dies. QEMU's virtio-net (7.2) sends them anyway: it attaches
//! its queue pairs when the guest driver writes its features, which is
//! before `vhost_dev_start` sends `SET_FEATURES`, and it does not send them
//! again afterwards. With `PROTOCOL_FEATURES` acked a ring starts disabled,
//! and `vhost-user-backend` drops the kicks of a disabled ring, so the
//! early requests matter. The relay answers each (an ack when the frontend
//! asked for one), keeps the last state asked for each ring, and once it
//! has forwarded a `SET_FEATURES` that acks `PROTOCOL_FEATURES` it sends the
//! daemon one `SET_VRING_ENABLE` per ring with that state, as later QEMUs
//! do themselves from `vhost_dev_start`. Every other message is forwarded
//! unchanged, attached fds included, in both directions.
//!
//! Only the control channel passes through here: the vrings live in guest
//! memory the daemon maps, and their kick and call eventfds travel once, as
//! attachments. A message the relay cannot frame (a body above
//! [`MAX_BODY_BYTES`], more than [`MAX_ATTACHED_FDS`] fds) ends the session
//! with an error naming what was wrong.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_F_PROTOCOL_FEATURES`, a bit of `SET_FEATURES`' value.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Header flags: version 1, a reply, and the frontend asking for one.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// The largest message body the relay frames: the protocol's own limit.
pub(super) const MAX_BODY_BYTES: usize = 0x1000;
/// The most fds one message may carry: the protocol's own limit.
pub(super) const MAX_ATTACHED_FDS: usize = 32;
/// The most rings whose early enable state the relay keeps (the vhost-user
/// protocol's own ceiling on a device's queues); a higher index is refused.
pub(super) const MAX_HELD_RINGS: u32 = 256;

const HEADER_BYTES: usize = 12;

/// Why a relayed session ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RelayEnd {
    /// The frontend closed its connection.
    FrontendHungUp,
    /// The daemon closed its end (its request loop ended).
    BackendHungUp,
    /// The server's stop event fired.
    Stopped,
}

/// One vhost-user message: the 12-byte header, its body and the fds that
/// came with it.
struct Message {
    header: [u8; HEADER_BYTES],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    /// A message with this header and body, no fds.
    fn new(request: u32, flags: u32, body: Vec<u8>) -> Self {
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        // Bodies are at most MAX_BODY_BYTES, so the length fits.
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Self {
            header,
            body,
            fds: Vec::new(),
        }
    }

    /// A `SET_VRING_ENABLE` body's ring index and state.
    fn vring_state(&self) -> Option<(u32, u32)> {
        let bytes = self.body.get(..8)?;
        Some((
            u32::from_le_bytes(bytes[0..4].try_into().ok()?),
            u32::from_le_bytes(bytes[4..8].try_into().ok()?),
        ))
    }

    /// `SET_VRING_ENABLE` of `ring` to `state`, asking for no reply.
    fn enable(ring: u32, state: u32) -> Self {
        let mut body = Vec::with_capacity(8);
        body.extend_from_slice(&ring.to_le_bytes());
        body.extend_from_slice(&state.to_le_bytes());
        Self::new(SET_VRING_ENABLE, VERSION_1, body)
    }

    /// The ack a backend sends for a request that asked for one: the
    /// request's code, flagged as a version-1 reply, with a zero u64 body
    /// (success).
    fn ack_for(request: u32) -> Self {
        Self::new(request, VERSION_1 | REPLY, 0u64.to_le_bytes().to_vec())
    }
}

/// Relays one session between `frontend` and `backend` (the daemon's
/// connection) until either hangs up or `stop` becomes readable.
pub(super) struct Relay {
    frontend: UnixStream,
    backend: UnixStream,
    protocol_features_acked: bool,
    held_back: u64,
    /// The last enable state asked for each ring before the features.
    held_states: std::collections::BTreeMap<u32, u32>,
}

impl Relay {
    pub(super) fn new(frontend: UnixStream, backend: UnixStream) -> Self {
        Self {
            frontend,
            backend,
            protocol_features_acked: false,
            held_back: 0,
            held_states: std::collections::BTreeMap::new(),
        }
    }

    /// How many early `SET_VRING_ENABLE` requests were answered here.
    pub(super) fn held_back(&self) -> u64 {
        self.held_back
    }

    pub(super) fn run(&mut self, stop: BorrowedFd<'_>) -> Result<RelayEnd, String> {
        loop {
            let (frontend_ready, backend_ready, stopped) = {
                let mut fds = [
                    PollFd::new(self.frontend.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.backend.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop, PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(errno) => return Err(format!("cannot poll the relayed sockets: {errno}")),
                }
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|events| !events.is_empty());
                (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
            };
            if stopped {
                return Ok(RelayEnd::Stopped);
            }
            if frontend_ready {
                let Some(message) = read_message(&self.frontend)
                    .map_err(|error| format!("reading from the frontend: {error}"))?
                else {
                    return Ok(RelayEnd::FrontendHungUp);
                };
                self.forward_from_frontend(message)?;
            }
            if backend_ready {
                let Some(message) = read_message(&self.backend)
                    .map_err(|error| format!("reading from the daemon: {error}"))?
                else {
                    return Ok(RelayEnd::BackendHungUp);
                };
                write_message(&self.frontend, &message)
                    .map_err(|error| format!("writing to the frontend: {error}"))?;
            }
        }
    }

    fn forward_from_frontend(&mut self, message: Message) -> Result<(), String> {
        match message.request() {
            SET_FEATURES => {
                let value = message
                    .body
                    .get(..8)
                    .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
                    .ok_or_else(|| {
                        format!(
                            "the frontend's SET_FEATURES has a {}-byte body, not 8",
                            message.body.len()
                        )
                    })?;
                self.protocol_features_acked = value & PROTOCOL_FEATURES != 0;
                write_message(&self.backend, &message)
                    .map_err(|error| format!("writing to the daemon: {error}"))?;
                // Without PROTOCOL_FEATURES the daemon enables every ring
                // itself; with it, the rings wait for these.
                let held = std::mem::take(&mut self.held_states);
                if self.protocol_features_acked {
                    for (ring, state) in held {
                        write_message(&self.backend, &Message::enable(ring, state))
                            .map_err(|error| format!("writing to the daemon: {error}"))?;
                    }
                }
                return Ok(());
            }
            SET_VRING_ENABLE if !self.protocol_features_acked => {
                let (ring, state) = message.vring_state().ok_or_else(|| {
                    format!(
                        "the frontend's SET_VRING_ENABLE has a {}-byte body, not 8",
                        message.body.len()
                    )
                })?;
                if ring >= MAX_HELD_RINGS {
                    return Err(format!(
                        "the frontend enables ring {ring}, above the {MAX_HELD_RINGS} rings a device may have"
                    ));
                }
                self.held_states.insert(ring, state);
                // Counted, not logged: a guest rewriting its features makes
                // QEMU send these; the server logs the count once a session.
                self.held_back += 1;
                if message.flags() & NEED_REPLY != 0 {
                    write_message(&self.frontend, &Message::ack_for(SET_VRING_ENABLE))
                        .map_err(|error| format!("acking the frontend: {error}"))?;
                }
                return Ok(());
            }
            _ => {}
        }
        write_message(&self.backend, &message)
            .map_err(|error| format!("writing to the daemon: {error}"))
    }
}

/// Reads one message, or `None` if the peer closed the connection between
/// messages.
fn read_message(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_BYTES];
    if !receive_exactly(stream, &mut header, &mut fds)? {
        return Ok(None);
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_BODY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message body of {size} bytes, above the protocol's {MAX_BODY_BYTES}"),
        ));
    }
    let mut body = vec![0u8; size];
    if !receive_exactly(stream, &mut body, &mut fds)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed inside a message",
        ));
    }
    Ok(Some(Message { header, body, fds }))
}

/// Fills `buffer`, keeping every fd that arrives with it. False if the
/// connection was closed before the first byte.
fn receive_exactly(
    stream: &UnixStream,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buffer.len() {
        let mut space = nix::cmsg_space!([RawFd; MAX_ATTACHED_FDS]);
        let mut iov = [IoSliceMut::new(&mut buffer[filled..])];
        let received = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(received) => received,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        let truncated = received.flags.contains(MsgFlags::MSG_CTRUNC);
        for control in received.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(numbers) = control {
                // SAFETY: SCM_RIGHTS gave this process these new fds and
                // nothing else owns them.
                fds.extend(
                    numbers
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if truncated || fds.len() > MAX_ATTACHED_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message with more than {MAX_ATTACHED_FDS} attached fds"),
            ));
        }
        let bytes = received.bytes;
        if bytes == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed inside a message",
            ));
        }
        filled += bytes;
    }
    Ok(true)
}

/// Writes `message` with its fds attached to its first byte, as the
/// protocol's peers send them.
fn write_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let numbers: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&numbers)];
    let control: &[ControlMessage<'_>] = if numbers.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(&message.header), IoSlice::new(&message.body)];
    let total = HEADER_BYTES + message.body.len();
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(sent) => break sent,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    };
    if sent < total {
        let mut whole = Vec::with_capacity(total);
        whole.extend_from_slice(&message.header);
        whole.extend_from_slice(&message.body);
        (&*stream).write_all(&whole[sent..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn request(code: u32, flags: u32, body: &[u8]) -> Message {
        Message::new(code, flags, body.to_vec())
    }

    /// A relay on its own thread between a test frontend and a test daemon.
    struct Harness {
        frontend: UnixStream,
        daemon: UnixStream,
        stop: OwnedFd,
        relay: std::thread::JoinHandle<(Result<RelayEnd, String>, u64)>,
    }

    fn harness() -> Harness {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (daemon, relay_back) = UnixStream::pair().unwrap();
        let (stop_reader, stop) = nix::unistd::pipe().unwrap();
        let relay = std::thread::spawn(move || {
            let mut relay = Relay::new(relay_front, relay_back);
            let end = relay.run(stop_reader.as_fd());
            (end, relay.held_back())
        });
        Harness {
            frontend,
            daemon,
            stop,
            relay,
        }
    }

    fn features(value: u64) -> Message {
        request(SET_FEATURES, VERSION_1, &value.to_le_bytes())
    }

    /// Ring 0 enabled, as QEMU sends it, with or without NEED_REPLY.
    fn enable(need_reply: bool) -> Message {
        let flags = VERSION_1 | if need_reply { NEED_REPLY } else { 0 };
        request(SET_VRING_ENABLE, flags, &Message::enable(0, 1).body)
    }

    #[test]
    fn an_early_enable_is_answered_and_the_rest_forwarded_in_order() {
        let harness = harness();
        write_message(&harness.frontend, &enable(false)).unwrap();
        write_message(&harness.frontend, &enable(true)).unwrap();
        let ack = read_message(&harness.frontend).unwrap().unwrap();
        assert_eq!(ack.request(), SET_VRING_ENABLE);
        assert_eq!(ack.flags(), VERSION_1 | REPLY);
        assert_eq!(ack.body, vec![0u8; 8]);

        write_message(&harness.frontend, &features(PROTOCOL_FEATURES | 1)).unwrap();
        write_message(&harness.frontend, &enable(true)).unwrap();
        let first = read_message(&harness.daemon).unwrap().unwrap();
        assert_eq!(
            first.request(),
            SET_FEATURES,
            "the early enables do not reach the daemon early"
        );
        assert_eq!(first.body, (PROTOCOL_FEATURES | 1).to_le_bytes());
        let replayed = read_message(&harness.daemon).unwrap().unwrap();
        assert_eq!(
            replayed.request(),
            SET_VRING_ENABLE,
            "right after the features, the ring's state"
        );
        assert_eq!(replayed.vring_state(), Some((0, 1)));
        assert_eq!(replayed.flags(), VERSION_1, "the replay asks for no reply");
        let second = read_message(&harness.daemon).unwrap().unwrap();
        assert_eq!(
            second.request(),
            SET_VRING_ENABLE,
            "after the ack, enables pass"
        );
        assert_eq!(second.flags(), VERSION_1 | NEED_REPLY);

        write_message(&harness.daemon, &Message::ack_for(SET_VRING_ENABLE)).unwrap();
        let reply = read_message(&harness.frontend).unwrap().unwrap();
        assert_eq!(reply.flags(), VERSION_1 | REPLY);

        drop(harness.frontend);
        let (end, held_back) = harness.relay.join().unwrap();
        assert_eq!(end, Ok(RelayEnd::FrontendHungUp));
        assert_eq!(held_back, 2);
        drop(harness.stop);
    }

    #[test]
    fn the_last_early_state_of_each_ring_is_replayed_once() {
        let harness = harness();
        for (ring, state) in [(0, 1), (1, 1), (0, 0), (1, 1), (0, 1)] {
            write_message(&harness.frontend, &Message::enable(ring, state)).unwrap();
        }
        write_message(&harness.frontend, &features(PROTOCOL_FEATURES)).unwrap();
        write_message(&harness.frontend, &request(1, VERSION_1, &[])).unwrap();
        assert_eq!(
            read_message(&harness.daemon).unwrap().unwrap().request(),
            SET_FEATURES
        );
        let rings: Vec<_> = (0..2)
            .map(|_| {
                read_message(&harness.daemon)
                    .unwrap()
                    .unwrap()
                    .vring_state()
            })
            .collect();
        assert_eq!(rings, vec![Some((0, 1)), Some((1, 1))]);
        assert_eq!(read_message(&harness.daemon).unwrap().unwrap().request(), 1);
        drop(harness.frontend);
        assert_eq!(
            harness.relay.join().unwrap().0,
            Ok(RelayEnd::FrontendHungUp)
        );
        drop(harness.stop);
    }

    #[test]
    fn an_enable_of_a_ring_past_the_ceiling_ends_the_session_naming_it() {
        let harness = harness();
        write_message(&harness.frontend, &Message::enable(MAX_HELD_RINGS, 1)).unwrap();
        let error = harness.relay.join().unwrap().0.unwrap_err();
        assert!(error.contains("ring 256"), "{error}");
        drop(harness.stop);
    }

    #[test]
    fn features_without_the_protocol_bit_keep_holding_enables_back() {
        let harness = harness();
        write_message(&harness.frontend, &features(1)).unwrap();
        write_message(&harness.frontend, &enable(false)).unwrap();
        write_message(&harness.frontend, &request(1, VERSION_1, &[])).unwrap();
        assert_eq!(
            read_message(&harness.daemon).unwrap().unwrap().request(),
            SET_FEATURES
        );
        assert_eq!(read_message(&harness.daemon).unwrap().unwrap().request(), 1);
        drop(harness.daemon);
        let (end, held_back) = harness.relay.join().unwrap();
        assert_eq!(end, Ok(RelayEnd::BackendHungUp));
        assert_eq!(held_back, 1);
        drop(harness.stop);
    }

    #[test]
    fn attached_fds_reach_the_daemon() {
        let harness = harness();
        let file = File::open("/proc/self/stat").unwrap();
        let mut message = request(5, VERSION_1, &[7u8; 40]);
        message.fds.push(OwnedFd::from(file.try_clone().unwrap()));
        message.fds.push(OwnedFd::from(file));
        write_message(&harness.frontend, &message).unwrap();
        let forwarded = read_message(&harness.daemon).unwrap().unwrap();
        assert_eq!(forwarded.request(), 5);
        assert_eq!(forwarded.body, vec![7u8; 40]);
        assert_eq!(forwarded.fds.len(), 2);
        let mut text = String::new();
        File::from(forwarded.fds.into_iter().next().unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.contains('('), "the fd is a readable file: {text}");
        drop(harness.frontend);
        assert_eq!(
            harness.relay.join().unwrap().0,
            Ok(RelayEnd::FrontendHungUp)
        );
        drop(harness.stop);
    }

    #[test]
    fn an_oversized_body_ends_the_session_naming_the_size() {
        let harness = harness();
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&3u32.to_le_bytes());
        header[8..12].copy_from_slice(&0x2000u32.to_le_bytes());
        (&harness.frontend).write_all(&header).unwrap();
        let error = harness.relay.join().unwrap().0.unwrap_err();
        assert!(error.contains("8192 bytes"), "{error}");
        drop(harness.stop);
    }

    #[test]
    fn the_stop_event_ends_the_relay() {
        let harness = harness();
        nix::unistd::write(&harness.stop, b"x").unwrap();
        assert_eq!(harness.relay.join().unwrap().0, Ok(RelayEnd::Stopped));
    }
}
