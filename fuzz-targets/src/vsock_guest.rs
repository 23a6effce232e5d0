//! A simulated guest for the vsock targets: the device model
//! (`husk_devices::vsock::VsockModel`, what both transports run) between
//! two driver-side virtqueues in fresh guest memory, plus the host side it
//! talks to, all on one thread, so every run of an input is the same.
//!
//! The host side lives once per process ([`HostSide`]): the device's
//! hybrid-vsock listener and three host services (`<uds>_<port>`) a guest
//! REQUEST reaches. Each input gets a fresh [`Guest`]: a new model and new
//! memory. [`Guest::finish`] drops the model and every host socket of the
//! input and checks that no file descriptor outlived it.
//!
//! Every packet the device puts in the rx queue is checked against the
//! virtio-vsock rules ([`check_rx_packet`]); the device's own flow-control
//! books are checked by debug assertions in its connection state machine.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use husk_devices::vsock::{VsockConfig, VsockModel, VsockTimeouts, CONN_BUF_ALLOC, HOST_CID};
use husk_test_support::virtqueue::DriverQueue;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// Size of `struct virtio_vsock_hdr` (virtio 1.2, 5.10.6).
pub const HDR_LEN: usize = 44;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload the device takes in one packet (Linux's 64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// `VIRTIO_VSOCK_OP_*` (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// Host ports with a listening host service (`<uds>_<port>`).
pub const SERVICE_PORTS: [u32; 3] = [1024, 1025, 5000];
/// Host-initiated connections get local ports from here up.
pub const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

/// Size of a regular rx buffer: Linux's 4 KiB plus the header.
pub const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const RX_QUEUE_SIZE: u16 = 64;
const TX_QUEUE_SIZE: u16 = 64;
/// Room for the largest packet in one descriptor.
const TX_BUF_STRIDE: u64 = 0x1_1000;
const MEM_SIZE: usize = 8 << 20;

/// One `struct virtio_vsock_hdr`, encoded and decoded here independently
/// of the device's own codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.type_.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; HDR_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let u32_at = |at: usize| {
            let mut field = [0u8; 4];
            field.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(field)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// A guest packet on the stream from guest port `src_port` to host
    /// port `dst_port`, advertising the full window.
    pub fn guest(op: u16, src_port: u32, dst_port: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: CONN_BUF_ALLOC,
            ..Self::default()
        }
    }
}

/// The host side shared by every input of a process.
pub struct HostSide {
    pub uds_path: PathBuf,
    listener: UnixListener,
    services: Vec<(u32, UnixListener)>,
}

impl HostSide {
    fn new() -> Self {
        let uds_path = crate::process_dir("fuzz-vsock").join("v.sock");
        let listener = bind(&uds_path);
        let services = SERVICE_PORTS
            .iter()
            .map(|&port| (port, bind(&service_path(&uds_path, port))))
            .collect();
        Self {
            uds_path,
            listener,
            services,
        }
    }

    /// Closes whatever waits in a listener's backlog, so the next input
    /// starts from empty queues.
    fn drain_backlogs(&self) {
        for listener in std::iter::once(&self.listener).chain(self.services.iter().map(|(_, l)| l))
        {
            while listener.accept().is_ok() {}
        }
    }
}

fn bind(path: &Path) -> UnixListener {
    let listener = UnixListener::bind(path)
        .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", path.display()));
    listener
        .set_nonblocking(true)
        .expect("cannot make a listener non-blocking");
    listener
}

fn service_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// The process's host side, made on first use.
pub fn host_side() -> &'static HostSide {
    static HOST: OnceLock<HostSide> = OnceLock::new();
    HOST.get_or_init(HostSide::new)
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// A host-side socket of one input: a stream a host service accepted, or
/// a hybrid-vsock client.
pub struct HostPeer {
    pub stream: UnixStream,
    /// The service port, or 0 for a hybrid-vsock client.
    pub service: u32,
}

/// Key of a connection as the guest sees it: (host port, guest port).
pub type StreamKey = (u32, u32);

/// One input's guest: the device model, its queues and what it received.
pub struct Guest {
    pub model: Option<VsockModel>,
    mem: GuestMemoryMmap,
    rx_queue: Queue,
    tx_queue: Queue,
    rx_driver: DriverQueue,
    tx_driver: DriverQueue,
    /// Writable bytes of each posted rx chain, by head.
    rx_capacity: HashMap<u16, usize>,
    /// Leave the rx ring empty after reaping (a guest that stops reading).
    pub withhold_rx: bool,
    /// Every packet the device delivered, in order.
    pub received: Vec<(Header, Vec<u8>)>,
    /// Payload bytes received per stream since it last (re)started, which
    /// an honest guest reports back as `fwd_cnt`.
    pub consumed: HashMap<StreamKey, u32>,
    /// Host ports of host-initiated connections the device announced.
    pub ephemeral_ports: Vec<u32>,
    pub peers: Vec<HostPeer>,
    fds_before: usize,
}

impl Guest {
    pub fn new() -> Self {
        let host = host_side();
        host.drain_backlogs();
        let fds_before = open_fds();
        let config = VsockConfig::new(GUEST_CID, host.uds_path.clone());
        let model = VsockModel::new(
            &config,
            VsockTimeouts::default(),
            &host.listener,
            husk_devices::guest_log::GuestLog::new(),
        )
        .expect("cannot create the vsock model");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("cannot allocate guest memory");
        let rx_driver = DriverQueue::new(&mem, 0x1000, RX_QUEUE_SIZE, u64::from(RX_BUF_LEN));
        let tx_driver = DriverQueue::new(&mem, rx_driver.end(), TX_QUEUE_SIZE, TX_BUF_STRIDE);
        assert!(tx_driver.end() <= MEM_SIZE as u64);
        let mut guest = Self {
            model: Some(model),
            rx_queue: rx_driver.device_queue(),
            tx_queue: tx_driver.device_queue(),
            mem,
            rx_driver,
            tx_driver,
            rx_capacity: HashMap::new(),
            withhold_rx: false,
            received: Vec::new(),
            consumed: HashMap::new(),
            ephemeral_ports: Vec::new(),
            peers: Vec::new(),
            fds_before,
        };
        guest.refill_rx();
        guest
    }

    fn model(&mut self) -> &mut VsockModel {
        self.model.as_mut().expect("the model is gone")
    }

    /// Posts an rx chain of `(length, device-writable)` parts; false when
    /// the ring has no room.
    pub fn post_rx(&mut self, parts: &[(u32, bool)]) -> bool {
        let parts: Vec<(u32, bool, &[u8])> = parts.iter().map(|&(l, w)| (l, w, &[][..])).collect();
        match self.rx_driver.add_chain(&self.mem, &parts) {
            Some(head) => {
                let capacity = parts.iter().filter(|p| p.1).map(|p| p.0 as usize).sum();
                self.rx_capacity.insert(head, capacity);
                true
            }
            None => false,
        }
    }

    fn refill_rx(&mut self) {
        if self.withhold_rx {
            return;
        }
        while self.rx_driver.free_descriptors() > 0 {
            self.post_rx(&[(RX_BUF_LEN, true)]);
        }
    }

    /// Posts a tx chain of `(length, device-writable, contents)` parts,
    /// making room by letting the device run once if the ring is full.
    /// Returns false when it stays full (the device stalled).
    pub fn post_tx(&mut self, parts: &[(u32, bool, &[u8])]) -> bool {
        if parts.is_empty() {
            return true;
        }
        if self.tx_driver.free_descriptors() < parts.len() {
            self.pump(true, true);
        }
        self.tx_driver.add_chain(&self.mem, parts).is_some()
    }

    /// Sends `header` and `payload` the way Linux does: the header in one
    /// descriptor, the payload (if any) in a second.
    pub fn send(&mut self, header: &Header, payload: &[u8]) -> bool {
        let encoded = header.encode();
        let mut parts: Vec<(u32, bool, &[u8])> = vec![(HDR_LEN as u32, false, &encoded)];
        if !payload.is_empty() {
            parts.push((payload.len() as u32, false, payload));
        }
        let posted = self.post_tx(&parts);
        self.pump(true, true);
        posted
    }

    /// Accepts the streams the device opened to the host services.
    pub fn accept_service_streams(&mut self) {
        for (port, listener) in &host_side().services {
            while let Ok((stream, _)) = listener.accept() {
                stream
                    .set_nonblocking(true)
                    .expect("cannot make a host stream non-blocking");
                self.peers.push(HostPeer {
                    stream,
                    service: *port,
                });
            }
        }
    }

    /// Connects a hybrid-vsock host client and sends it `bytes`.
    pub fn connect_host_client(&mut self, bytes: &[u8]) -> usize {
        let mut stream =
            UnixStream::connect(&host_side().uds_path).expect("cannot reach the vsock socket");
        stream
            .set_nonblocking(true)
            .expect("cannot make a host client non-blocking");
        if !bytes.is_empty() {
            // A full socket buffer only shortens what the device sees.
            let _ = stream.write(bytes);
        }
        self.peers.push(HostPeer { stream, service: 0 });
        self.peers.len() - 1
    }

    /// Lets the model react to host sockets, then runs the queues.
    pub fn host_events(&mut self) {
        self.model().process_host_events();
        self.pump(false, true);
    }

    /// One device turn: tx and/or rx, then the guest reaps used buffers
    /// (checking each rx packet) and reposts rx buffers.
    pub fn pump(&mut self, run_tx: bool, run_rx: bool) {
        let Self {
            model,
            mem,
            rx_queue,
            tx_queue,
            ..
        } = self;
        let model = model.as_mut().expect("the model is gone");
        model
            .pump(mem, rx_queue, tx_queue, run_tx, run_rx)
            .expect("the device failed on well-formed rings");
        while self.tx_driver.pop_used(&self.mem).is_some() {}
        while let Some((head, len, data)) = self.rx_driver.pop_used(&self.mem) {
            let capacity = self.rx_capacity.remove(&head).unwrap_or(0);
            if let Some(packet) = check_rx_packet(len, &data, capacity) {
                self.note_received(&packet.0);
                self.received.push(packet);
            }
        }
        self.accept_service_streams();
        self.refill_rx();
    }

    fn note_received(&mut self, header: &Header) {
        let key = (header.src_port, header.dst_port);
        match header.op {
            op::RW => {
                let seen = self.consumed.entry(key).or_default();
                *seen = seen.wrapping_add(header.len);
            }
            op::REQUEST => {
                self.consumed.insert(key, 0);
                if !self.ephemeral_ports.contains(&header.src_port) {
                    self.ephemeral_ports.push(header.src_port);
                }
            }
            op::RESPONSE | op::RST => {
                self.consumed.insert(key, 0);
            }
            _ => {}
        }
    }

    /// Device-driver reset as vhost-user's SET_FEATURES does it.
    pub fn reset_connections(&mut self) {
        self.model().reset_connections();
        self.consumed.clear();
    }

    /// Reads what is waiting on host peer `index` (non-blocking); None at
    /// end of stream.
    pub fn read_peer(&mut self, index: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.peers[index].stream.read(&mut buf) {
                Ok(0) => return if out.is_empty() { None } else { Some(out) },
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(out),
            }
        }
    }

    /// Drops the model and every host socket of this input, and checks
    /// that the process holds no more file descriptors than before it.
    pub fn finish(mut self) {
        self.model.take();
        self.peers.clear();
        host_side().drain_backlogs();
        let after = open_fds();
        assert_eq!(
            after, self.fds_before,
            "file descriptors leaked: {} before the input, {after} after",
            self.fds_before
        );
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks one used rx buffer against the virtio-vsock rules and returns
/// the packet, or None for a buffer the device returned unused (length 0,
/// which it does for chains it cannot use).
pub fn check_rx_packet(len: u32, data: &[u8], capacity: usize) -> Option<(Header, Vec<u8>)> {
    let len = len as usize;
    if len == 0 {
        return None;
    }
    assert!(
        len >= HDR_LEN,
        "rx used length {len} is shorter than a header"
    );
    assert!(
        len <= capacity,
        "rx used length {len} exceeds the chain's {capacity} writable bytes"
    );
    assert_eq!(data.len(), len, "the chain holds fewer bytes than used");
    let mut raw = [0u8; HDR_LEN];
    raw.copy_from_slice(&data[..HDR_LEN]);
    let header = Header::decode(&raw);
    assert_eq!(
        header.len as usize + HDR_LEN,
        len,
        "used length disagrees with the header: {header:?}"
    );
    assert!(header.len as usize <= MAX_PKT_PAYLOAD, "{header:?}");
    assert_eq!(header.src_cid, HOST_CID, "{header:?}");
    assert_eq!(header.dst_cid, GUEST_CID, "{header:?}");
    assert!(
        (op::REQUEST..=op::CREDIT_REQUEST).contains(&header.op),
        "the device sent unknown op {}: {header:?}",
        header.op
    );
    if header.op == op::RW {
        assert!(header.len > 0, "an empty RW packet: {header:?}");
    } else {
        assert_eq!(header.len, 0, "a non-RW packet with payload: {header:?}");
    }
    if header.op != op::RST {
        // Connection packets carry our stream type and window; only the
        // RST answering a stray packet echoes the guest's type.
        assert_eq!(header.type_, TYPE_STREAM, "{header:?}");
        assert_eq!(header.buf_alloc, CONN_BUF_ALLOC, "{header:?}");
    }
    if header.op == op::SHUTDOWN {
        assert!(
            header.flags != 0 && header.flags & !3 == 0,
            "bad SHUTDOWN flags: {header:?}"
        );
    }
    Some((header, data[HDR_LEN..].to_vec()))
}
