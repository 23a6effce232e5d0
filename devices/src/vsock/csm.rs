//! The state machine of one vsock stream between a guest socket and a host
//! Unix socket, with its credit-based flow control (virtio 1.2, 5.10.6.3).
//!
//! A [`Connection`] owns the host stream (non-blocking, registered
//! edge-triggered by the muxer) and reacts to three things: packets from the
//! guest ([`Connection::on_guest_packet`]), readiness of the host socket
//! ([`Connection::on_host_event`]) and deadlines
//! ([`Connection::on_deadline`]). It produces guest-bound packets only when
//! the muxer hands it an rx buffer ([`Connection::fill_rx`]), one packet per
//! turn, so connections share the rx queue round-robin.
//!
//! Flow control, guest to host: we advertise `buf_alloc` = [`CONN_BUF_ALLOC`]
//! and count in `fwd_cnt` the bytes the host socket accepted. Bytes the host
//! socket refuses wait in a per-connection buffer, which the guest's credit
//! bounds to `buf_alloc`; a slow host reader therefore stalls only its own
//! guest sender. Host to guest: we never read more from the host socket than
//! the guest's credit (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`), so data
//! waits in the host socket's own kernel buffer.

use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::GuestMemory;

use super::packet::{
    op, PacketHeader, RxBuffer, TxPayload, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{VsockTimeouts, HOST_CID};
use crate::guest_log::{guest_warn, GuestLog};

/// Receive buffer we advertise per connection: Linux's default
/// `VIRTIO_VSOCK_DEFAULT_BUF_SIZE` (256 KiB), the window its guests expect.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// When the guest's view of our free space drops below this, and we have
/// forwarded bytes it has not heard of, we send a CREDIT_UPDATE. Half the
/// window keeps a sender streaming without an update per packet.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;

/// Identifies a connection: our (host-side) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for RESPONSE.
    Connecting { deadline: Instant },
    /// Data may flow (possibly half-closed one way).
    Established,
    /// Both directions are finished; waiting for the guest's RST (or for the
    /// host-bound buffer to drain) until the deadline.
    Closing { deadline: Instant },
}

/// What the muxer must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Send RST to the guest and forget the connection.
    Reset,
    /// Forget the connection without telling the guest (it reset or
    /// already knows).
    Remove,
}

/// Guest-bound control packets a connection owes.
#[derive(Clone, Copy, Debug, Default)]
struct PendingControl {
    request: bool,
    response: bool,
    shutdown_flags: u32,
    credit_update: bool,
    credit_request: bool,
}

impl PendingControl {
    fn any(&self) -> bool {
        self.request
            || self.response
            || self.shutdown_flags != 0
            || self.credit_update
            || self.credit_request
    }
}

/// One guest socket <-> host Unix socket stream.
pub struct Connection {
    pub key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    state: ConnState,
    timeouts: VsockTimeouts,
    pending: PendingControl,
    /// The muxer's rx round-robin queue holds this connection.
    pub in_rx_queue: bool,

    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    credit_requested: bool,

    // Guest -> host.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    host_buf: Vec<u8>,
    host_buf_head: usize,
    /// Bytes at the front of `host_buf` that are ours (the `OK` line), not
    /// the guest's, so they do not count in `fwd_cnt`.
    host_buf_unaccounted: usize,

    // Host socket readiness (edge-triggered, cleared only on EAGAIN or EOF).
    host_readable: bool,
    host_writable: bool,
    host_hup: bool,

    /// SHUTDOWN flags the guest sent us.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent (or queued for) the guest.
    local_shutdown: u32,
    /// The guest will send no more: shut the host socket's write side once
    /// `host_buf` drains.
    shut_host_write_after_flush: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        state: ConnState,
        timeouts: VsockTimeouts,
    ) -> Self {
        Self {
            key,
            guest_cid,
            stream,
            state,
            timeouts,
            pending: PendingControl::default(),
            in_rx_queue: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            credit_requested: false,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            host_buf: Vec::new(),
            host_buf_head: 0,
            host_buf_unaccounted: 0,
            host_readable: false,
            host_writable: true,
            host_hup: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            shut_host_write_after_flush: false,
        }
    }

    /// A host client asked for guest port `key.peer_port`: owe the guest a
    /// REQUEST and wait for its RESPONSE until `now + timeouts.connect`.
    pub fn new_host_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        timeouts: VsockTimeouts,
        now: Instant,
    ) -> Self {
        let state = ConnState::Connecting {
            deadline: now + timeouts.connect,
        };
        let mut conn = Self::new(stream, key, guest_cid, state, timeouts);
        conn.pending.request = true;
        conn
    }

    /// The guest's REQUEST reached a host listener: owe it a RESPONSE.
    pub fn new_guest_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        timeouts: VsockTimeouts,
        request: &PacketHeader,
    ) -> Self {
        let mut conn = Self::new(stream, key, guest_cid, ConnState::Established, timeouts);
        conn.update_peer_credit(request);
        conn.pending.response = true;
        conn
    }

    /// The host stream, for epoll registration.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The deadline the muxer's timer must honour, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            ConnState::Connecting { deadline } | ConnState::Closing { deadline } => Some(deadline),
            ConnState::Established => None,
        }
    }

    /// Credit the guest gives us: how many more bytes it can take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes from the guest waiting for the host socket.
    pub fn host_buffered(&self) -> usize {
        self.host_buf.len() - self.host_buf_head
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.local_shutdown & SHUTDOWN_SEND == 0
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest right now.
    pub fn wants_rx(&self) -> bool {
        self.pending.any() || (self.host_readable && self.can_send_data() && self.peer_credit() > 0)
    }

    /// When the host has data but the guest gave no credit, ask once.
    fn refresh_credit_request(&mut self) {
        if self.host_readable
            && self.can_send_data()
            && self.peer_credit() == 0
            && !self.credit_requested
        {
            self.pending.credit_request = true;
            self.credit_requested = true;
        }
    }

    /// Queues a CREDIT_UPDATE when the guest's view of our free space runs
    /// low and we have freed space it has not heard of.
    fn refresh_credit_update(&mut self) {
        let perceived_used = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let perceived_free = CONN_BUF_ALLOC.saturating_sub(perceived_used);
        if perceived_free < CREDIT_UPDATE_THRESHOLD && self.fwd_cnt != self.last_fwd_cnt_sent {
            self.pending.credit_update = true;
        }
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> PacketHeader {
        // Every packet carries our credit, so it doubles as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// An RST for this connection, for the muxer to queue when it drops it.
    pub fn rst_header(&self) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            type_: TYPE_STREAM,
            op: op::RST,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..PacketHeader::default()
        }
    }

    fn enter_closing(&mut self, now: Instant) {
        if !matches!(self.state, ConnState::Closing { .. }) {
            self.state = ConnState::Closing {
                deadline: now + self.timeouts.close_grace,
            };
        }
    }

    /// Handles one packet the guest sent on this connection; a protocol
    /// violation worth a warning is logged on the device's `guest_log`.
    pub fn on_guest_packet<M: GuestMemory>(
        &mut self,
        hdr: &PacketHeader,
        payload: &TxPayload<'_, M>,
        now: Instant,
        guest_log: &GuestLog,
    ) -> Verdict {
        if hdr.op == op::RST {
            return Verdict::Remove;
        }
        self.update_peer_credit(hdr);
        let verdict = match (self.state, hdr.op) {
            (ConnState::Connecting { .. }, op::RESPONSE) => self.on_response(),
            (ConnState::Connecting { .. }, _) => Verdict::Reset,
            (_, op::RW) => self.on_rw(payload, guest_log),
            (_, op::CREDIT_UPDATE) => Verdict::Keep,
            (_, op::CREDIT_REQUEST) => {
                self.pending.credit_update = true;
                Verdict::Keep
            }
            (_, op::SHUTDOWN) => self.on_shutdown(hdr.flags, now),
            // REQUEST or RESPONSE on a live connection, or an unknown op.
            _ => Verdict::Reset,
        };
        if verdict == Verdict::Keep {
            self.refresh_credit_request();
            self.debug_check_accounting();
        }
        verdict
    }

    /// The flow-control books balance: every byte the guest sent that the
    /// host socket has not taken yet waits in `host_buf` (behind our own
    /// `OK` line, which counts for nothing), and there are never more of
    /// them than the window we advertise. Checked in debug builds, so the
    /// unit tests and the fuzz targets see a broken count at once.
    fn debug_check_accounting(&self) {
        let unforwarded = (self.rx_cnt - self.fwd_cnt).0 as usize;
        debug_assert!(
            self.host_buf_unaccounted <= self.host_buffered(),
            "{:?}: {} bytes of our own in a {}-byte host buffer",
            self.key,
            self.host_buf_unaccounted,
            self.host_buffered()
        );
        debug_assert_eq!(
            unforwarded,
            self.host_buffered() - self.host_buf_unaccounted.min(self.host_buffered()),
            "{:?}: rx_cnt - fwd_cnt disagrees with the guest bytes buffered",
            self.key
        );
        debug_assert!(
            unforwarded <= CONN_BUF_ALLOC as usize,
            "{:?}: {unforwarded} guest bytes held, more than the {CONN_BUF_ALLOC}-byte window",
            self.key
        );
    }

    fn on_response(&mut self) -> Verdict {
        self.state = ConnState::Established;
        // The handshake's answer goes ahead of any guest data.
        let line = format!("OK {}\n", self.key.local_port);
        match send_nosignal(&self.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(n) => {
                self.host_buf.extend_from_slice(&line.as_bytes()[n..]);
                self.host_buf_unaccounted = line.len() - n;
                self.host_writable = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_buf.extend_from_slice(line.as_bytes());
                self.host_buf_unaccounted = line.len();
                self.host_writable = false;
            }
            Err(e) => {
                tracing::debug!(port = self.key.local_port, error = %e, "vsock host client went away during handshake");
                return Verdict::Reset;
            }
        }
        Verdict::Keep
    }

    fn on_rw<M: GuestMemory>(
        &mut self,
        payload: &TxPayload<'_, M>,
        guest_log: &GuestLog,
    ) -> Verdict {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            tracing::debug!(?self.key, "guest sent data after SHUTDOWN(SEND)");
            return Verdict::Reset;
        }
        let len = payload.len();
        if len == 0 {
            return Verdict::Keep;
        }
        let used = (self.rx_cnt - self.fwd_cnt).0 as usize;
        if used + len > CONN_BUF_ALLOC as usize {
            guest_warn!(guest_log, ?self.key, len, used, "guest exceeded its vsock credit");
            return Verdict::Reset;
        }
        self.rx_cnt += Wrapping(len as u32);
        crate::counters::vsock_bytes_from_guest(len);
        let mut written = 0;
        if self.host_buffered() == 0 && self.host_writable {
            match payload.write_to(self.stream.as_fd(), 0) {
                Ok(n) => {
                    written = n;
                    self.fwd_cnt += Wrapping(n as u32);
                    if n < len {
                        self.host_writable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) => {
                    tracing::debug!(?self.key, error = %e, "vsock host socket write failed");
                    return Verdict::Reset;
                }
            }
        }
        if written < len {
            self.compact_host_buf();
            if !payload.copy_to_vec(written, &mut self.host_buf) {
                return Verdict::Reset;
            }
        }
        self.refresh_credit_update();
        Verdict::Keep
    }

    fn on_shutdown(&mut self, flags: u32, now: Instant) -> Verdict {
        let new = flags & SHUTDOWN_BOTH & !self.peer_shutdown;
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if new & SHUTDOWN_RCV != 0 {
            // The guest reads no more: make the host's writes fail early.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if new & SHUTDOWN_SEND != 0 {
            if self.host_buffered() == 0 {
                let _ = self.stream.shutdown(Shutdown::Write);
            } else {
                self.shut_host_write_after_flush = true;
            }
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed its socket. Deliver what is buffered, then
            // answer with the RST Linux waits for.
            if self.host_buffered() == 0 {
                return Verdict::Reset;
            }
            self.enter_closing(now);
        }
        Verdict::Keep
    }

    /// Handles readiness of the host socket.
    pub fn on_host_event(
        &mut self,
        readable: bool,
        writable: bool,
        hup: bool,
        now: Instant,
    ) -> Verdict {
        if readable || hup {
            self.host_readable = true;
        }
        if hup {
            self.host_hup = true;
            // The host client is gone. If we cannot read its EOF out to the
            // guest (we already said SEND, or the guest reads no more), close
            // both ways now.
            if !self.can_send_data() && self.state == ConnState::Established {
                self.local_shutdown |= SHUTDOWN_BOTH;
                self.pending.shutdown_flags |= SHUTDOWN_BOTH;
                self.enter_closing(now);
            }
        }
        if writable {
            self.host_writable = true;
            if let Verdict::Reset = self.flush_host_buf() {
                return Verdict::Reset;
            }
            if matches!(self.state, ConnState::Closing { .. })
                && self.peer_shutdown == SHUTDOWN_BOTH
                && self.host_buffered() == 0
            {
                return Verdict::Reset;
            }
        }
        self.refresh_credit_request();
        self.debug_check_accounting();
        Verdict::Keep
    }

    fn compact_host_buf(&mut self) {
        if self.host_buf_head > 0 && self.host_buf_head * 2 >= self.host_buf.len() {
            self.host_buf.drain(..self.host_buf_head);
            self.host_buf_head = 0;
        }
    }

    fn flush_host_buf(&mut self) -> Verdict {
        while self.host_buffered() > 0 && self.host_writable {
            match send_nosignal(&self.stream, &self.host_buf[self.host_buf_head..]) {
                Ok(n) => {
                    self.host_buf_head += n;
                    let ours = n.min(self.host_buf_unaccounted);
                    self.host_buf_unaccounted -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                    if self.host_buffered() > 0 {
                        self.host_writable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(?self.key, error = %e, "vsock host socket write failed");
                    return Verdict::Reset;
                }
            }
        }
        if self.host_buffered() == 0 {
            self.host_buf.clear();
            self.host_buf_head = 0;
            if self.shut_host_write_after_flush {
                self.shut_host_write_after_flush = false;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        } else {
            self.compact_host_buf();
        }
        self.refresh_credit_update();
        Verdict::Keep
    }

    /// A deadline passed: an unanswered REQUEST or an unfinished close.
    pub fn on_deadline(&mut self, now: Instant) -> Verdict {
        match self.state {
            ConnState::Connecting { deadline } | ConnState::Closing { deadline }
                if now >= deadline =>
            {
                tracing::debug!(?self.key, state = ?self.state, "vsock connection timed out");
                Verdict::Reset
            }
            _ => Verdict::Keep,
        }
    }

    /// Writes the connection's next guest-bound packet into `rx`. Returns
    /// the bytes written (header included), or `None` if it had nothing.
    pub fn fill_rx<M: GuestMemory>(
        &mut self,
        rx: &RxBuffer<'_, M>,
        now: Instant,
    ) -> (Option<u32>, Verdict) {
        let header = if self.pending.request {
            self.pending.request = false;
            // The guest gets the full connect timeout from the moment it can
            // see the REQUEST.
            self.state = ConnState::Connecting {
                deadline: now + self.timeouts.connect,
            };
            self.header(op::REQUEST, 0, 0)
        } else if self.pending.response {
            self.pending.response = false;
            self.header(op::RESPONSE, 0, 0)
        } else {
            match self.read_host_data(rx, now) {
                Ok(Some(header)) => header,
                Ok(None) => match self.next_control() {
                    Some(header) => header,
                    None => return (None, Verdict::Keep),
                },
                Err(()) => return (None, Verdict::Reset),
            }
        };
        if !rx.write_header(&header) {
            return (None, Verdict::Reset);
        }
        self.debug_check_accounting();
        (
            Some(super::packet::HDR_LEN as u32 + header.len),
            Verdict::Keep,
        )
    }

    fn next_control(&mut self) -> Option<PacketHeader> {
        if self.pending.shutdown_flags != 0 {
            let flags = self.pending.shutdown_flags;
            self.pending.shutdown_flags = 0;
            return Some(self.header(op::SHUTDOWN, 0, flags));
        }
        if self.pending.credit_update {
            return Some(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        if self.pending.credit_request {
            self.pending.credit_request = false;
            return Some(self.header(op::CREDIT_REQUEST, 0, 0));
        }
        None
    }

    /// Reads host bytes into `rx` within the guest's credit. `Ok(None)`
    /// means no data now; `Err` means the host socket failed.
    fn read_host_data<M: GuestMemory>(
        &mut self,
        rx: &RxBuffer<'_, M>,
        now: Instant,
    ) -> Result<Option<PacketHeader>, ()> {
        if !(self.host_readable && self.can_send_data()) {
            return Ok(None);
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            self.refresh_credit_request();
            return Ok(None);
        }
        let want = credit.min(rx.payload_capacity());
        match rx.read_payload_from(self.stream.as_fd(), want) {
            Ok(0) => {
                // End of the host's stream. If it also hung up, it is gone:
                // close both ways and wait for the guest's RST.
                self.host_readable = false;
                let flags = if self.host_hup {
                    SHUTDOWN_BOTH
                } else {
                    SHUTDOWN_SEND
                };
                self.local_shutdown |= flags;
                if flags == SHUTDOWN_BOTH {
                    self.enter_closing(now);
                }
                Ok(Some(self.header(op::SHUTDOWN, 0, flags)))
            }
            Ok(n) => {
                debug_assert!(
                    n <= credit,
                    "{:?}: read {n} host bytes with {credit} bytes of guest credit",
                    self.key
                );
                // Stay readable even after a short read: the host's end of
                // stream may have come with the data in the same edge (the
                // peer wrote, shut down and closed before we looked), and no
                // further edge would announce it. The next turn reads again
                // and sees EOF, or EAGAIN, which clears the flag.
                self.tx_cnt += Wrapping(n as u32);
                crate::counters::vsock_bytes_to_guest(n);
                let header = self.header(op::RW, n as u32, 0);
                // This packet may have used the last of the guest's credit.
                self.refresh_credit_request();
                Ok(Some(header))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(?self.key, error = %e, "vsock host socket read failed");
                Err(())
            }
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a host peer that went away yields EPIPE,
/// not SIGPIPE.
fn send_nosignal(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: data is a readable buffer of the given length.
        let ret = unsafe {
            libc::send(
                stream.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
