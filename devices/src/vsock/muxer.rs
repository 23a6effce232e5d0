//! The Unix-socket backend: it multiplexes every guest stream onto host
//! Unix sockets.
//!
//! The muxer owns a private epoll instance holding the listening socket on
//! `uds_path`, a timerfd for deadlines, and every host stream (edge
//! triggered). Its epoll fd is the single thing a transport's event loop
//! watches for the backend ([`Muxer::as_raw_fd`]); when it fires, the loop
//! calls [`Muxer::process_host_events`]. Host clients first go through the
//! `CONNECT <port>\n` handshake ([`Handshake`]), then become a
//! [`Connection`]. Guest packets come in through
//! [`Muxer::handle_guest_packet`]; guest-bound packets leave through
//! [`Muxer::fill_rx`], which serves connections round-robin so that one busy
//! stream cannot starve the rest.
//!
//! The muxer holds at most `max_connections` streams ([`VsockConfig`]),
//! counting host clients still in their handshake, so a handshake that
//! completes always finds its slot. A guest REQUEST beyond the limit gets
//! RST; a host client beyond it is closed as soon as it is accepted (the
//! hybrid protocol has no error reply: the client sees end of stream
//! instead of `OK`). Both are counted ([`RefusedConnections`]). Warnings a
//! guest can repeat at will (refused or unwatchable streams, failing
//! accepts) go through the device's [`GuestLog`].

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::csm::{ConnKey, Connection, Verdict};
use super::packet::{op, PacketHeader, RxBuffer, TxPayload, HDR_LEN, TYPE_STREAM};
use super::{VsockConfig, VsockError, VsockTimeouts, HOST_CID};
use crate::counters::{self, Initiator};
use crate::guest_log::{guest_warn, GuestBytes, GuestLog};

/// Epoll token of the listening socket.
const LISTENER_TOKEN: u64 = 0;
/// Epoll token of the deadline timer.
const TIMER_TOKEN: u64 = 1;
/// First token handed to a host stream.
const FIRST_STREAM_TOKEN: u64 = 2;
/// Epoll events fetched per `epoll_wait`; more are fetched in a loop.
const EVENTS_PER_WAIT: usize = 256;
/// `CONNECT 4294967295\n` is 19 bytes; anything longer without a newline is
/// not a handshake.
const MAX_CONNECT_LINE: usize = 32;
/// The deadline timer ticks at this period while any deadline is pending;
/// timeouts are thus honoured within this much. A tick scans all streams,
/// which costs microseconds even at thousands of connections.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Host-initiated connections get local ports from here up, like
/// Firecracker's hybrid vsock: far above the ports guest services listen on.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// Where a muxer starts handing out ports: a random point above
/// [`FIRST_EPHEMERAL_PORT`]. A guest restored from a template may still
/// hold a stream the template's host side opened (host port
/// `FIRST_EPHEMERAL_PORT + k`); a muxer that also started there would
/// give a new connection that same port, and the guest would drop the
/// request as a duplicate of its stale stream.
fn random_first_port() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into `bytes`.
    let got =
        unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
    let random = if got == bytes.len() as isize {
        u32::from_ne_bytes(bytes)
    } else {
        // No entropy yet (early boot): the clock's nanoseconds will do.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    };
    FIRST_EPHEMERAL_PORT + random % (u32::MAX - FIRST_EPHEMERAL_PORT)
}

/// RSTs for unknown connections waiting for rx buffers. When this many are
/// queued the transport stops taking tx packets until rx drains, so a guest
/// cannot grow this queue without bound.
const MAX_ORPHAN_PACKETS: usize = 1024;

/// A host client that has connected but not yet sent its `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    deadline: Instant,
}

/// Streams refused because the device was at its connection limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusedConnections {
    /// Guest REQUESTs answered with RST.
    pub guest_initiated: u64,
    /// Host clients closed before their handshake.
    pub host_initiated: u64,
}

/// What an epoll token refers to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Handshake,
    Connection(ConnKey),
}

/// The hybrid-vsock host backend.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    timeouts: VsockTimeouts,
    max_connections: usize,
    refused: RefusedConnections,
    guest_log: GuestLog,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    connections: HashMap<ConnKey, (u64, Connection)>,
    handshakes: HashMap<u64, Handshake>,
    targets: HashMap<u64, Target>,
    next_token: u64,
    next_ephemeral_port: u32,
    rx_queue: VecDeque<ConnKey>,
    orphans: VecDeque<PacketHeader>,
    events: Vec<EpollEvent>,
}

/// Binds the device's listening socket at `path`, mode 0600 whatever
/// the process's umask: only its owner (the shim's user) may connect.
pub fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })?;
    crate::owner_only(path).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| VsockError::Bind {
            path: path.to_owned(),
            source,
        })?;
    Ok(listener)
}

fn event_error(what: &'static str) -> impl FnOnce(io::Error) -> VsockError {
    move |source| VsockError::Event { what, source }
}

/// Connects to a host listener without blocking the event loop: a Unix
/// connect either completes at once, or fails (`EAGAIN` when the listener's
/// backlog is full, which we report as a refused connection).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own from here on.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
    let ret = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parses `CONNECT <port>` (without the newline).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line.strip_prefix(b"CONNECT ")?;
    std::str::from_utf8(port).ok()?.trim().parse().ok()
}

impl Muxer {
    /// A muxer serving `config`, listening on `listener` (bound to
    /// `config.uds_path`), logging guest-triggered warnings on `guest_log`.
    pub fn new(
        config: &VsockConfig,
        timeouts: VsockTimeouts,
        listener: UnixListener,
        guest_log: GuestLog,
    ) -> Result<Self, VsockError> {
        config.validate()?;
        listener
            .set_nonblocking(true)
            .map_err(event_error("listener O_NONBLOCK"))?;
        let epoll = Epoll::new().map_err(event_error("epoll_create"))?;
        let timer = TimerFd::new()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            .map_err(event_error("timerfd_create"))?;
        // Non-blocking, so that reading an expiration count can never stall
        // the event loop (TimerFd::new does not set O_NONBLOCK).
        // SAFETY: fcntl on an fd we own; the result is checked.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(VsockError::Event {
                what: "timerfd O_NONBLOCK",
                source: io::Error::last_os_error(),
            });
        }
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(event_error("register listener"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(event_error("register timer"))?;
        Ok(Self {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            timeouts,
            max_connections: config.max_connections,
            refused: RefusedConnections::default(),
            guest_log,
            listener,
            epoll,
            timer,
            timer_armed: false,
            connections: HashMap::new(),
            handshakes: HashMap::new(),
            targets: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_ephemeral_port: random_first_port(),
            rx_queue: VecDeque::new(),
            orphans: VecDeque::new(),
            events: vec![EpollEvent::default(); EVENTS_PER_WAIT],
        })
    }

    /// Drops every connection (their host clients see end of stream) and
    /// every queued guest-bound packet: the guest driver was reset, so none
    /// of its sockets exist any more. Pending handshakes stay.
    pub fn reset_connections(&mut self) {
        for (_, (token, conn)) in self.connections.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
            self.targets.remove(&token);
        }
        self.rx_queue.clear();
        self.orphans.clear();
    }

    /// Number of live connections (handshakes excluded).
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Streams refused at the connection limit so far (each refusal's
    /// warning also carries the running count as `refused`).
    #[cfg(test)]
    pub fn refused_connections(&self) -> RefusedConnections {
        self.refused
    }

    /// The device's budget for guest-triggered log lines.
    pub fn guest_log(&self) -> &GuestLog {
        &self.guest_log
    }

    /// Whether one more stream (or handshake) would exceed the limit.
    fn at_connection_limit(&self) -> bool {
        self.connections.len() + self.handshakes.len() >= self.max_connections
    }

    /// Whether the muxer has packets for the guest.
    pub fn has_rx(&self) -> bool {
        !self.orphans.is_empty() || !self.rx_queue.is_empty()
    }

    /// Whether tx processing should pause until rx drains.
    pub fn tx_backlog_full(&self) -> bool {
        self.orphans.len() >= MAX_ORPHAN_PACKETS
    }

    fn alloc_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            match self.timer.reset(TIMER_TICK, Some(TIMER_TICK)) {
                Ok(()) => self.timer_armed = true,
                Err(error) => tracing::error!(%error, "cannot arm the vsock deadline timer"),
            }
        }
    }

    /// Drains the muxer's epoll without blocking and handles every event.
    pub fn process_host_events(&mut self) {
        let now = Instant::now();
        loop {
            let mut events = std::mem::take(&mut self.events);
            let count = match self.epoll.wait(0, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(error) => {
                    tracing::error!(%error, "vsock muxer epoll_wait failed");
                    0
                }
            };
            for event in &events[..count] {
                self.handle_event(event.data(), event.event_set(), now);
            }
            self.events = events;
            if count < EVENTS_PER_WAIT {
                break;
            }
        }
    }

    fn handle_event(&mut self, token: u64, set: EventSet, now: Instant) {
        match token {
            LISTENER_TOKEN => self.accept_all(now),
            TIMER_TOKEN => {
                // The expiration count does not matter, only that it fired.
                let _ = self.timer.wait();
                self.check_deadlines(now);
            }
            _ => match self.targets.get(&token).copied() {
                Some(Target::Handshake) => self.advance_handshake(token, now),
                Some(Target::Connection(key)) => {
                    let readable =
                        set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::ERROR);
                    let writable = set.intersects(EventSet::OUT | EventSet::ERROR);
                    let hup = set.contains(EventSet::HANG_UP);
                    if let Some((_, conn)) = self.connections.get_mut(&key) {
                        let verdict = conn.on_host_event(readable, writable, hup, now);
                        self.settle(key, verdict);
                    }
                }
                None => {}
            },
        }
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(error) => {
                    // EMFILE and friends: the pending client stays in the
                    // backlog; the level-triggered listener retries later,
                    // and warns again, so the warning is rate-limited.
                    guest_warn!(self.guest_log, %error, path = %self.uds_path.display(), "vsock accept failed");
                    return;
                }
            };
            if self.at_connection_limit() {
                // Dropping the stream closes it: the client reads end of
                // stream where it expected `OK`.
                self.refused.host_initiated += 1;
                counters::vsock_refused(Initiator::Host);
                guest_warn!(
                    self.guest_log,
                    limit = self.max_connections,
                    refused = self.refused.host_initiated,
                    "vsock connection limit reached; closing host client"
                );
                continue;
            }
            if let Err(error) = stream.set_nonblocking(true) {
                tracing::warn!(%error, "cannot make a vsock host client non-blocking");
                continue;
            }
            let token = self.alloc_token();
            let interest = EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
            if let Err(error) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(interest, token),
            ) {
                tracing::warn!(%error, "cannot watch a vsock host client");
                continue;
            }
            self.targets.insert(token, Target::Handshake);
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    deadline: now + self.timeouts.handshake,
                },
            );
            self.arm_timer();
            // Edge-triggered: bytes that arrived before registration raise
            // no edge, so look now.
            self.advance_handshake(token, now);
        }
    }

    fn drop_handshake(&mut self, token: u64) {
        if let Some(handshake) = self.handshakes.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                handshake.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.targets.remove(&token);
    }

    fn advance_handshake(&mut self, token: u64, now: Instant) {
        let Some(handshake) = self.handshakes.get(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_CONNECT_LINE];
        // Peek, so that bytes after the newline stay in the socket for the
        // guest; only the line itself is consumed.
        // SAFETY: peek is a writable buffer of the given length.
        let ret = unsafe {
            libc::recv(
                handshake.stream.as_raw_fd(),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return;
            }
            self.drop_handshake(token);
            return;
        }
        let peeked = &peek[..ret as usize];
        if peeked.is_empty() {
            self.drop_handshake(token);
            return;
        }
        let Some(newline) = peeked.iter().position(|&b| b == b'\n') else {
            if peeked.len() >= MAX_CONNECT_LINE {
                tracing::debug!("vsock host client sent an overlong handshake line");
                self.drop_handshake(token);
            }
            return;
        };
        let port = parse_connect_line(&peeked[..newline]);
        let mut line = [0u8; MAX_CONNECT_LINE];
        // Consume exactly the line; it is known to be in the socket.
        // SAFETY: line is a writable buffer of at least newline + 1 bytes.
        let consumed = unsafe {
            libc::recv(
                handshake.stream.as_raw_fd(),
                line.as_mut_ptr().cast(),
                newline + 1,
                libc::MSG_DONTWAIT,
            )
        };
        let Some(port) = port.filter(|_| consumed == (newline + 1) as isize) else {
            tracing::debug!(line = %GuestBytes(&peeked[..newline]), "vsock host client sent a malformed handshake");
            self.drop_handshake(token);
            return;
        };
        let Some(handshake) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(local_port) = self.alloc_ephemeral_port(port) else {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                handshake.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.targets.remove(&token);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let interest =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(error) = self.epoll.ctl(
            ControlOperation::Modify,
            handshake.stream.as_raw_fd(),
            EpollEvent::new(interest, token),
        ) {
            tracing::warn!(%error, "cannot watch a vsock host stream");
            self.targets.remove(&token);
            return;
        }
        tracing::debug!(
            guest_port = port,
            host_port = local_port,
            "vsock host-initiated connection"
        );
        let conn = Connection::new_host_initiated(
            handshake.stream,
            key,
            self.guest_cid,
            self.timeouts,
            now,
        );
        self.targets.insert(token, Target::Connection(key));
        self.connections.insert(key, (token, conn));
        counters::vsock_opened(Initiator::Host);
        self.settle(key, Verdict::Keep);
    }

    fn alloc_ephemeral_port(&mut self, peer_port: u32) -> Option<u32> {
        // At most `max_connections` ports are taken, so this many tries
        // find a free one.
        for _ in 0..=self.max_connections {
            let port = self.next_ephemeral_port;
            // u32::MAX is VMADDR_PORT_ANY, never a port.
            self.next_ephemeral_port = if port >= u32::MAX - 1 {
                FIRST_EPHEMERAL_PORT
            } else {
                port + 1
            };
            if !self.connections.contains_key(&ConnKey {
                local_port: port,
                peer_port,
            }) {
                return Some(port);
            }
        }
        None
    }

    fn check_deadlines(&mut self, now: Instant) {
        let expired_handshakes: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now >= h.deadline)
            .map(|(token, _)| *token)
            .collect();
        for token in expired_handshakes {
            tracing::debug!("vsock host client did not complete its handshake in time");
            self.drop_handshake(token);
        }
        let mut any_deadline = !self.handshakes.is_empty();
        let mut expired = Vec::new();
        for (key, (_, conn)) in &self.connections {
            if let Some(deadline) = conn.deadline() {
                any_deadline = true;
                if now >= deadline {
                    expired.push(*key);
                }
            }
        }
        for key in expired {
            if let Some((_, conn)) = self.connections.get_mut(&key) {
                let verdict = conn.on_deadline(now);
                self.settle(key, verdict);
            }
        }
        if !any_deadline && self.timer_armed {
            match self.timer.clear() {
                Ok(()) => self.timer_armed = false,
                Err(error) => tracing::warn!(%error, "cannot disarm the vsock deadline timer"),
            }
        }
    }

    /// Applies a connection's verdict and keeps the rx queue and timer in
    /// step with its new state.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {
                let Some((_, conn)) = self.connections.get_mut(&key) else {
                    return;
                };
                let has_deadline = conn.deadline().is_some();
                if conn.wants_rx() && !conn.in_rx_queue {
                    conn.in_rx_queue = true;
                    self.rx_queue.push_back(key);
                }
                if has_deadline {
                    self.arm_timer();
                }
            }
            Verdict::Reset | Verdict::Remove => {
                if let Some((token, conn)) = self.connections.remove(&key) {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        conn.stream().as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.targets.remove(&token);
                    if verdict == Verdict::Reset {
                        self.orphans.push_back(conn.rst_header());
                    }
                    tracing::debug!(?key, ?verdict, "vsock connection closed");
                }
            }
        }
    }

    fn rst_reply(&self, to: &PacketHeader) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: to.type_,
            op: op::RST,
            ..PacketHeader::default()
        }
    }

    fn queue_orphan_rst(&mut self, to: &PacketHeader) {
        if to.op != op::RST {
            let rst = self.rst_reply(to);
            self.orphans.push_back(rst);
        }
    }

    /// The path a guest connection to host port `port` is forwarded to.
    pub fn host_port_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    /// Handles one packet from the guest's tx queue.
    pub fn handle_guest_packet<M: GuestMemory>(
        &mut self,
        hdr: &PacketHeader,
        payload: &TxPayload<'_, M>,
    ) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src_cid = hdr.src_cid,
                dst_cid = hdr.dst_cid,
                "vsock packet with foreign addresses dropped"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            // SEQPACKET is not offered; RST tells the guest nobody listens.
            self.queue_orphan_rst(hdr);
            return;
        }
        let now = Instant::now();
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some((_, conn)) = self.connections.get_mut(&key) {
            let verdict = conn.on_guest_packet(hdr, payload, now, &self.guest_log);
            self.settle(key, verdict);
            return;
        }
        if hdr.op == op::REQUEST {
            self.connect_to_host(key, hdr);
        } else {
            self.queue_orphan_rst(hdr);
        }
    }

    fn connect_to_host(&mut self, key: ConnKey, hdr: &PacketHeader) {
        if self.at_connection_limit() {
            self.refused.guest_initiated += 1;
            counters::vsock_refused(Initiator::Guest);
            guest_warn!(
                self.guest_log,
                limit = self.max_connections,
                port = key.local_port,
                refused = self.refused.guest_initiated,
                "vsock connection limit reached; refusing guest connection"
            );
            self.queue_orphan_rst(hdr);
            return;
        }
        let path = self.host_port_path(key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, path = %path.display(), port = key.local_port, "vsock guest connection refused");
                self.queue_orphan_rst(hdr);
                return;
            }
        };
        let token = self.alloc_token();
        let interest =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(error) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(interest, token),
        ) {
            guest_warn!(self.guest_log, %error, path = %path.display(), "cannot watch a vsock host stream");
            self.queue_orphan_rst(hdr);
            return;
        }
        tracing::debug!(
            port = key.local_port,
            guest_port = key.peer_port,
            "vsock guest-initiated connection"
        );
        let conn = Connection::new_guest_initiated(stream, key, self.guest_cid, self.timeouts, hdr);
        self.targets.insert(token, Target::Connection(key));
        self.connections.insert(key, (token, conn));
        counters::vsock_opened(Initiator::Guest);
        self.settle(key, Verdict::Keep);
    }

    /// Writes the next guest-bound packet into `rx`. Returns the bytes
    /// written, or `None` when nothing is pending (the buffer stays unused).
    pub fn fill_rx<M: GuestMemory>(&mut self, rx: &RxBuffer<'_, M>) -> Option<u32> {
        let now = Instant::now();
        loop {
            if let Some(orphan) = self.orphans.pop_front() {
                if rx.write_header(&orphan) {
                    return Some(HDR_LEN as u32);
                }
                return None;
            }
            let key = self.rx_queue.pop_front()?;
            let Some((_, conn)) = self.connections.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            let (written, verdict) = conn.fill_rx(rx, now);
            self.settle(key, verdict);
            if let Some(len) = written {
                return Some(len);
            }
        }
    }
}

impl AsRawFd for Muxer {
    /// The muxer's epoll fd: readable when the backend has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
