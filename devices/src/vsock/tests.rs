//! Unit tests of the vsock model: the packet codec on hand-built descriptor
//! chains, the connection state machine and muxer through a simulated guest
//! driver ([`Harness`]), and both transport adapters.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::csm::CONN_BUF_ALLOC;
use super::muxer::RefusedConnections;
use super::packet::{
    self, op, PacketError, PacketHeader, RxBuffer, TxPayload, HDR_LEN, MAX_PKT_PAYLOAD,
    SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_SEQPACKET,
};
use super::test_support::{DriverQueue, Harness, TestDir};
use super::{VsockConfig, VsockDevice, VsockTimeouts, HOST_CID, VIRTIO_ID_VSOCK};
use crate::guest_log::{Clock, GuestLog, GUEST_LOG_INTERVAL};
use crate::{ActivatedQueue, VirtioDevice, VirtioInterrupt};

const SHORT_TIMEOUTS: VsockTimeouts = VsockTimeouts {
    connect: Duration::from_millis(200),
    handshake: Duration::from_millis(200),
    close_grace: Duration::from_millis(200),
};
const WAIT: Duration = Duration::from_secs(5);

fn small_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn sample_header() -> PacketHeader {
    PacketHeader {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1234,
        dst_port: 1024,
        len: 5,
        type_: 1,
        op: op::RW,
        flags: 0,
        buf_alloc: 0x0004_0000,
        fwd_cnt: 77,
    }
}

// ---- packet codec -------------------------------------------------------

#[test]
fn header_encodes_fields_at_spec_offsets_in_little_endian() {
    let header = sample_header();
    let bytes = header.encode();
    assert_eq!(bytes.len(), 44);
    assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
    assert_eq!(&bytes[8..16], &2u64.to_le_bytes());
    assert_eq!(&bytes[16..20], &1234u32.to_le_bytes());
    assert_eq!(&bytes[20..24], &1024u32.to_le_bytes());
    assert_eq!(&bytes[24..28], &5u32.to_le_bytes());
    assert_eq!(&bytes[28..30], &1u16.to_le_bytes());
    assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
    assert_eq!(&bytes[36..40], &0x0004_0000u32.to_le_bytes());
    assert_eq!(&bytes[40..44], &77u32.to_le_bytes());
    assert_eq!(PacketHeader::decode(&bytes), header);
}

#[test]
fn tx_packet_with_header_and_payload_spanning_descriptors_parses() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    let header = sample_header().encode();
    let mut wire = header.to_vec();
    wire.extend_from_slice(b"hello");
    // 10 + 36 bytes: the header ends two bytes into the second descriptor,
    // and the payload continues in a third.
    driver.add_chain(
        &mem,
        &[
            (10, false, &wire[..10]),
            (36, false, &wire[10..46]),
            (3, false, &wire[46..]),
        ],
    );
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let mut segments = Vec::new();
    let parsed = packet::parse_tx(&mem, chain, &mut segments).unwrap();
    assert_eq!(parsed, sample_header());
    let payload = TxPayload::new(&mem, &segments, parsed.len as usize);
    let mut out = Vec::new();
    assert!(payload.copy_to_vec(0, &mut out));
    assert_eq!(out, b"hello");
    let mut tail = Vec::new();
    assert!(payload.copy_to_vec(3, &mut tail));
    assert_eq!(tail, b"lo");
}

#[test]
fn tx_payload_written_to_a_socket_with_writev_arrives_whole() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    let header = sample_header().encode();
    driver.add_chain(
        &mem,
        &[(44, false, &header), (2, false, b"he"), (3, false, b"llo")],
    );
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let mut segments = Vec::new();
    let parsed = packet::parse_tx(&mem, chain, &mut segments).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let written = TxPayload::new(&mem, &segments, parsed.len as usize)
        .write_to(a.as_fd(), 1)
        .unwrap();
    assert_eq!(written, 4);
    let mut got = [0u8; 4];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ello");
}

#[test]
fn tx_packet_announcing_more_payload_than_the_chain_holds_is_rejected() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    let mut header = sample_header();
    header.len = 100;
    driver.add_chain(
        &mem,
        &[(44, false, &header.encode()), (10, false, &[0; 10])],
    );
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let err = packet::parse_tx(&mem, chain, &mut Vec::new()).unwrap_err();
    assert_eq!(
        err,
        PacketError::PayloadTruncated {
            head: 0,
            len: 100,
            available: 10
        }
    );
}

#[test]
fn tx_packet_with_payload_over_64_kib_is_rejected() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    let mut header = sample_header();
    header.len = MAX_PKT_PAYLOAD as u32 + 1;
    driver.add_chain(&mem, &[(44, false, &header.encode())]);
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let err = packet::parse_tx(&mem, chain, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(err, PacketError::PayloadTooLarge { .. }),
        "{err:?}"
    );
}

#[test]
fn tx_chain_shorter_than_a_header_or_with_writable_parts_is_rejected() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    driver.add_chain(&mem, &[(20, false, &[0; 20])]);
    driver.add_chain(
        &mem,
        &[(44, false, &sample_header().encode()), (5, true, &[0; 5])],
    );
    let short = queue.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        packet::parse_tx(&mem, short, &mut Vec::new()).unwrap_err(),
        PacketError::HeaderTruncated { head: 0, len: 20 }
    );
    let writable = queue.pop_descriptor_chain(&mem).unwrap();
    assert!(matches!(
        packet::parse_tx(&mem, writable, &mut Vec::new()).unwrap_err(),
        PacketError::WritableInTx { .. }
    ));
}

#[test]
fn rx_chain_shorter_than_a_header_is_rejected() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    driver.add_chain(&mem, &[(40, true, &[0; 40])]);
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        packet::parse_rx(&mem, chain, &mut Vec::new()).unwrap_err(),
        PacketError::HeaderTruncated { head: 0, len: 40 }
    );
}

#[test]
fn rx_buffer_takes_header_and_socket_data_across_descriptors() {
    let mem = small_memory();
    let mut driver = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut queue = driver.device_queue();
    driver.add_chain(
        &mem,
        &[
            (20, true, &[0; 20]),
            (30, true, &[0; 30]),
            (100, true, &[0; 100]),
        ],
    );
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let mut segments = Vec::new();
    let total = packet::parse_rx(&mem, chain, &mut segments).unwrap();
    assert_eq!(total, 150);
    let rx = RxBuffer::new(&mem, &segments, total);
    assert_eq!(rx.payload_capacity(), 106);
    let (mut a, b) = UnixStream::pair().unwrap();
    let data: Vec<u8> = (0..200u8).collect();
    a.write_all(&data).unwrap();
    let n = rx.read_payload_from(b.as_fd(), 80).unwrap();
    assert_eq!(n, 80);
    assert!(rx.write_header(&sample_header()));
    let mut raw = [0u8; HDR_LEN];
    assert!(packet::read_segments(&mem, &segments, 0, &mut raw));
    assert_eq!(PacketHeader::decode(&raw), sample_header());
    let mut payload = vec![0u8; 80];
    assert!(packet::read_segments(
        &mem,
        &segments,
        HDR_LEN,
        &mut payload
    ));
    assert_eq!(payload, data[..80]);
    // The rest fills at most the remaining capacity.
    assert_eq!(rx.read_payload_from(b.as_fd(), 1000).unwrap(), 106);
}

// ---- connection state machine and muxer ----------------------------------

fn read_line(stream: &UnixStream) -> String {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut reader = stream;
    while reader.read(&mut byte).unwrap() == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn assert_eof(stream: &mut UnixStream) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected end of stream, got {other:?}"),
    }
}

/// Host client connects to guest `port`; the guest accepts. Returns the
/// client and the device's host port for the stream.
fn host_initiated(h: &mut Harness, port: u32) -> (UnixStream, u32) {
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let (request, _) = h.expect_op(op::REQUEST);
    assert_eq!(
        (request.src_cid, request.dst_cid, request.dst_port),
        (HOST_CID, h.guest_cid, port)
    );
    let response = h.guest_header(op::RESPONSE, port, request.src_port);
    h.send(&response, &[]);
    assert_eq!(read_line(&client), format!("OK {}\n", request.src_port));
    (client, request.src_port)
}

/// The guest connects from `guest_port` to host port `port`, where a host
/// listener waits. Returns the host side of the stream.
fn guest_initiated(
    h: &mut Harness,
    listener: &UnixListener,
    guest_port: u32,
    port: u32,
) -> UnixStream {
    let request = h.guest_header(op::REQUEST, guest_port, port);
    h.send(&request, &[]);
    let (response, _) = h.expect_op(op::RESPONSE);
    assert_eq!((response.src_port, response.dst_port), (port, guest_port));
    let (stream, _) = listener.accept().unwrap();
    stream
}

fn guest_rw(h: &mut Harness, guest_port: u32, host_port: u32, data: &[u8]) {
    let header = h.guest_header(op::RW, guest_port, host_port);
    h.send(&header, data);
}

/// Collects `len` bytes of RW payload the guest received on `host_port`.
fn guest_read(h: &mut Harness, host_port: u32, len: usize) -> Vec<u8> {
    h.pump_until(WAIT, |received| {
        received
            .iter()
            .filter(|(hd, _)| hd.op == op::RW && hd.src_port == host_port)
            .map(|(_, d)| d.len())
            .sum::<usize>()
            >= len
    });
    let mut out = Vec::new();
    h.received.retain(|(hd, d)| {
        if hd.op == op::RW && hd.src_port == host_port {
            out.extend_from_slice(d);
            false
        } else {
            true
        }
    });
    out
}

#[test]
fn host_connect_line_yields_request_and_guest_response_yields_ok_with_host_port() {
    let mut h = Harness::new();
    let (_client, host_port) = host_initiated(&mut h, 1024);
    assert!(
        host_port >= 1 << 30,
        "host port {host_port} is not in the ephemeral range"
    );
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn host_client_is_closed_when_guest_answers_request_with_rst() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client.write_all(b"CONNECT 9999\n").unwrap();
    let (request, _) = h.expect_op(op::REQUEST);
    let rst = h.guest_header(op::RST, 9999, request.src_port);
    h.send(&rst, &[]);
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn malformed_connect_line_closes_the_host_client() {
    let mut h = Harness::new();
    for line in ["HELLO 1024\n", "CONNECT abc\n", "CONNECT 99999999999\n"] {
        let mut client = UnixStream::connect(&h.uds_path).unwrap();
        client.write_all(line.as_bytes()).unwrap();
        h.pump_until(WAIT, |_| true);
        for _ in 0..10 {
            h.pump();
        }
        assert_eof(&mut client);
    }
    assert!(h.received.iter().all(|(hd, _)| hd.op != op::REQUEST));
}

#[test]
fn overlong_handshake_without_newline_closes_the_host_client() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client.write_all(&[b'C'; 64]).unwrap();
    h.pump();
    assert_eof(&mut client);
}

#[test]
fn host_client_silent_past_the_handshake_timeout_is_closed() {
    let mut h = Harness::with_timeouts(SHORT_TIMEOUTS);
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client.write_all(b"CONNECT 10").unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        h.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eof(&mut client);
    assert!(h.received.is_empty());
}

#[test]
fn bytes_sent_right_after_the_connect_line_reach_the_guest_after_ok() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client.write_all(b"CONNECT 1024\nearly bytes").unwrap();
    let (request, _) = h.expect_op(op::REQUEST);
    let response = h.guest_header(op::RESPONSE, 1024, request.src_port);
    h.send(&response, &[]);
    assert_eq!(read_line(&client), format!("OK {}\n", request.src_port));
    assert_eq!(guest_read(&mut h, request.src_port, 11), b"early bytes");
}

#[test]
fn guest_connect_reaches_the_listener_at_uds_path_underscore_port() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5000", h.uds_path.display())).unwrap();
    let mut host = guest_initiated(&mut h, &listener, 40000, 5000);
    guest_rw(&mut h, 40000, 5000, b"ping");
    let mut got = [0u8; 4];
    host.set_read_timeout(Some(WAIT)).unwrap();
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    host.write_all(b"pong").unwrap();
    assert_eq!(guest_read(&mut h, 5000, 4), b"pong");
}

#[test]
fn guest_connect_to_a_host_port_nobody_listens_on_gets_rst() {
    let mut h = Harness::new();
    let request = h.guest_header(op::REQUEST, 40000, 6000);
    h.send(&request, &[]);
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!(
        (rst.src_port, rst.dst_port, rst.dst_cid),
        (6000, 40000, h.guest_cid)
    );
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn packet_for_an_unknown_connection_gets_rst_but_an_rst_gets_no_reply() {
    let mut h = Harness::new();
    let rw = h.guest_header(op::RW, 1, 2);
    h.send(&rw, b"x");
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (2, 1));
    let rst = h.guest_header(op::RST, 1, 2);
    h.send(&rst, &[]);
    h.pump();
    assert!(h.received.is_empty(), "unexpected reply: {:?}", h.received);
}

#[test]
fn seqpacket_request_is_refused_with_rst() {
    let mut h = Harness::new();
    let mut request = h.guest_header(op::REQUEST, 7, 8);
    request.type_ = TYPE_SEQPACKET;
    h.send(&request, &[]);
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!(rst.type_, TYPE_SEQPACKET);
}

#[test]
fn packet_with_a_foreign_source_cid_is_dropped() {
    let mut h = Harness::new();
    let mut request = h.guest_header(op::REQUEST, 7, 8);
    request.src_cid = 42;
    h.send(&request, &[]);
    h.pump();
    assert!(h.received.is_empty());
}

/// A clock that never moves: every guest-log line falls in one window.
struct FrozenClock(Instant);

impl Clock for FrozenClock {
    fn now(&self) -> Instant {
        self.0
    }
}

#[test]
fn streams_beyond_max_connections_are_refused_both_ways_counted_and_logged_within_budget() {
    let guest_log =
        GuestLog::with_clock(2, GUEST_LOG_INTERVAL, Box::new(FrozenClock(Instant::now())));
    let mut h = Harness::with_limits(VsockTimeouts::default(), 3, guest_log.clone());
    let listener = UnixListener::bind(format!("{}_5000", h.uds_path.display())).unwrap();
    let _first = guest_initiated(&mut h, &listener, 40001, 5000);
    let _second = guest_initiated(&mut h, &listener, 40002, 5000);
    let (_host_client, _) = host_initiated(&mut h, 1024);
    assert_eq!(h.muxer.connection_count(), 3);

    // The guest's fourth REQUEST gets RST, and no host socket is opened.
    let request = h.guest_header(op::REQUEST, 40004, 5000);
    h.send(&request, &[]);
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (5000, 40004));
    listener.set_nonblocking(true).unwrap();
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the refused REQUEST reached the host listener"
    );

    // A fourth host client is closed before the guest hears of it.
    let mut refused_client = UnixStream::connect(&h.uds_path).unwrap();
    refused_client.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    assert_eof(&mut refused_client);
    assert!(
        h.received
            .iter()
            .all(|(header, _)| header.op != op::REQUEST),
        "a REQUEST went out for a refused host client"
    );
    assert_eq!(
        h.muxer.refused_connections(),
        RefusedConnections {
            guest_initiated: 1,
            host_initiated: 1
        }
    );

    // Closing one stream frees its slot.
    let close = h.guest_header(op::RST, 40001, 5000);
    h.send(&close, &[]);
    assert_eq!(h.muxer.connection_count(), 2);
    listener.set_nonblocking(false).unwrap();
    let _third = guest_initiated(&mut h, &listener, 40005, 5000);
    assert_eq!(h.muxer.connection_count(), 3);

    // A guest hammering the limit gets RST every time; the log takes two
    // lines (its budget) and counts the rest.
    for port in 41000..41005 {
        let request = h.guest_header(op::REQUEST, port, 5000);
        h.send(&request, &[]);
        let (rst, _) = h.expect_op(op::RST);
        assert_eq!(rst.dst_port, port);
    }
    assert_eq!(h.muxer.refused_connections().guest_initiated, 6);
    assert_eq!(guest_log.written_total(), 2);
    assert_eq!(guest_log.suppressed_total(), 5);
}

#[test]
fn a_config_with_max_connections_0_is_refused() {
    let dir = TestDir::new("vsock").unwrap();
    let config = VsockConfig {
        max_connections: 0,
        ..VsockConfig::new(3, dir.path().join("x.sock"))
    };
    let Err(error) = VsockDevice::new(config) else {
        panic!("a device that may hold no connection was built");
    };
    assert!(error.to_string().contains("max_connections"), "{error}");
}

#[test]
fn host_to_guest_data_stops_at_guest_credit_and_credit_update_resumes_it() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let (request, _) = h.expect_op(op::REQUEST);
    let host_port = request.src_port;
    let mut response = h.guest_header(op::RESPONSE, 1024, host_port);
    response.buf_alloc = 1000;
    h.send(&response, &[]);
    read_line(&client);
    client.write_all(&[7u8; 5000]).unwrap();
    // Only the 1000 bytes of credit arrive, however long we wait.
    h.pump_until(WAIT, |r| r.iter().any(|(hd, _)| hd.op == op::RW));
    for _ in 0..20 {
        h.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    let delivered: usize = h
        .received
        .iter()
        .filter(|(hd, _)| hd.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(delivered, 1000);
    assert!(
        h.received.iter().any(|(hd, _)| hd.op == op::CREDIT_REQUEST),
        "device should ask for credit when stalled"
    );
    h.received.clear();
    // The guest's application read everything: it reports fwd_cnt = 1000.
    let mut update = h.guest_header(op::CREDIT_UPDATE, 1024, host_port);
    update.buf_alloc = 1000;
    update.fwd_cnt = 1000;
    h.send(&update, &[]);
    assert_eq!(guest_read(&mut h, host_port, 1000).len(), 1000);
    let delivered: usize = h
        .received
        .iter()
        .filter(|(hd, _)| hd.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(delivered, 0, "no more than the new credit");
}

#[test]
fn guest_exceeding_the_device_credit_is_reset() {
    let mut h = Harness::new();
    let (mut client, host_port) = host_initiated(&mut h, 1024);
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    // The host never reads, so nothing is forwarded and the window fills.
    // The host socket's kernel buffer absorbs a few hundred KiB, then the
    // device's own window; 1 MiB is well past both.
    for _ in 0..16 {
        guest_rw(&mut h, 1024, host_port, &chunk);
    }
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!(rst.src_port, host_port);
    // The host socket is closed after its buffered data.
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn slow_host_reader_holds_fwd_cnt_and_credit_updates_keep_a_credit_obeying_guest_flowing() {
    let mut h = Harness::new();
    let (client, host_port) = host_initiated(&mut h, 1024);
    h.received.clear();
    let pattern = |at: usize| (at % 251) as u8;
    let window = CONN_BUF_ALLOC as usize;
    // The guest fills the whole window while the host reads nothing.
    for k in 0..window / MAX_PKT_PAYLOAD {
        let chunk: Vec<u8> = (k * MAX_PKT_PAYLOAD..(k + 1) * MAX_PKT_PAYLOAD)
            .map(pattern)
            .collect();
        guest_rw(&mut h, 1024, host_port, &chunk);
    }
    let seen_fwd_cnt = |h: &Harness| {
        h.received
            .iter()
            .map(|(hd, _)| hd.fwd_cnt as usize)
            .max()
            .unwrap_or(0)
    };
    assert!(
        seen_fwd_cnt(&h) < window,
        "the device claimed bytes the host never read"
    );
    assert!(h.received.iter().all(|(hd, _)| hd.op != op::RST));

    // Now the host reads, and a guest that obeys its credit sends 1 MiB more.
    let total = window + (1 << 20);
    let reader = std::thread::spawn(move || {
        let mut client = client;
        let mut got = vec![0u8; total];
        client.set_read_timeout(Some(WAIT)).unwrap();
        client.read_exact(&mut got).unwrap();
        got
    });
    let mut sent = window;
    let start = Instant::now();
    while sent < total {
        assert!(
            start.elapsed() < WAIT,
            "guest stalled at {sent} bytes; fwd_cnt seen {}",
            seen_fwd_cnt(&h)
        );
        let credit = window - (sent - seen_fwd_cnt(&h));
        if credit == 0 {
            h.pump();
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let len = credit.min(MAX_PKT_PAYLOAD).min(total - sent);
        let data: Vec<u8> = (sent..sent + len).map(pattern).collect();
        guest_rw(&mut h, 1024, host_port, &data);
        sent += len;
    }
    let got = reader.join().unwrap();
    assert!(
        got.iter().enumerate().all(|(at, &b)| b == pattern(at)),
        "data corrupted or reordered"
    );
    assert!(h.received.iter().all(|(hd, _)| hd.op != op::RST));
    assert!(h.received.iter().any(|(hd, _)| hd.op == op::CREDIT_UPDATE));
}

#[test]
fn guest_shutdown_send_gives_the_host_eof_while_host_to_guest_still_flows() {
    let mut h = Harness::new();
    let (mut client, host_port) = host_initiated(&mut h, 1024);
    guest_rw(&mut h, 1024, host_port, b"last words");
    let mut shutdown = h.guest_header(op::SHUTDOWN, 1024, host_port);
    shutdown.flags = SHUTDOWN_SEND;
    h.send(&shutdown, &[]);
    let mut got = Vec::new();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    client.write_all(b"still talking").unwrap();
    assert_eq!(guest_read(&mut h, host_port, 13), b"still talking");
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn host_shutdown_write_sends_shutdown_send_and_guest_data_still_reaches_host() {
    let mut h = Harness::new();
    let (mut client, host_port) = host_initiated(&mut h, 1024);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let (shutdown, _) = h.expect_op(op::SHUTDOWN);
    assert_eq!(shutdown.flags, SHUTDOWN_SEND);
    guest_rw(&mut h, 1024, host_port, b"reply");
    let mut got = [0u8; 5];
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");
}

/// The host writes its last bytes and closes before the device looks: one
/// edge-triggered event carries data and end of stream together, so the
/// short read of the data must not be taken for "drained".
#[test]
fn host_data_and_close_in_one_event_give_the_guest_the_data_then_shutdown() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5000", h.uds_path.display())).unwrap();
    let mut host = guest_initiated(&mut h, &listener, 40000, 5000);
    host.write_all(&[7u8; 1000]).unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    drop(host);
    assert_eq!(guest_read(&mut h, 5000, 1000), vec![7u8; 1000]);
    let (shutdown, _) = h.expect_op(op::SHUTDOWN);
    assert_eq!(shutdown.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
}

/// The guest tier's `vsock-many`: ten guest connections open at once, each
/// sends 1000 bytes and shuts down its write side; the host echoes each,
/// shuts down its write side and closes. Every guest socket must get its
/// echo and then end of stream.
#[test]
fn ten_guest_connections_echoed_by_the_host_all_get_their_echo_and_eof() {
    const CONNECTIONS: u32 = 10;
    const BYTES: usize = 1000;
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5002", h.uds_path.display())).unwrap();
    let mut echoes = Vec::new();
    for index in 0..CONNECTIONS {
        let mut stream = guest_initiated(&mut h, &listener, 50000 + index, 5002);
        echoes.push(std::thread::spawn(move || {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).unwrap();
            stream.write_all(&got).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            got.len()
        }));
    }
    for index in 0..CONNECTIONS {
        let data = vec![index as u8; BYTES];
        guest_rw(&mut h, 50000 + index, 5002, &data);
        let mut shutdown = h.guest_header(op::SHUTDOWN, 50000 + index, 5002);
        shutdown.flags = SHUTDOWN_SEND;
        h.send(&shutdown, &[]);
    }
    for echo in echoes {
        assert_eq!(echo.join().unwrap(), BYTES);
    }
    let finished = |received: &std::collections::VecDeque<(PacketHeader, Vec<u8>)>, port: u32| {
        let bytes: usize = received
            .iter()
            .filter(|(hd, _)| hd.op == op::RW && hd.dst_port == port)
            .map(|(_, d)| d.len())
            .sum();
        let eof = received.iter().any(|(hd, _)| {
            hd.op == op::SHUTDOWN && hd.dst_port == port && hd.flags & SHUTDOWN_SEND != 0
        });
        bytes == BYTES && eof
    };
    h.pump_until(WAIT, |received| {
        (0..CONNECTIONS).all(|index| finished(received, 50000 + index))
    });
    for index in 0..CONNECTIONS {
        let echoed: Vec<u8> = h
            .received
            .iter()
            .filter(|(hd, _)| hd.op == op::RW && hd.dst_port == 50000 + index)
            .flat_map(|(_, d)| d.iter().copied())
            .collect();
        assert_eq!(echoed, vec![index as u8; BYTES]);
    }
}

#[test]
fn unanswered_request_is_reset_and_the_client_closed_after_the_connect_timeout() {
    let mut h = Harness::with_timeouts(SHORT_TIMEOUTS);
    let mut client = UnixStream::connect(&h.uds_path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let (request, _) = h.expect_op(op::REQUEST);
    let start = Instant::now();
    let (rst, _) = h.expect_op(op::RST);
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "reset too early: {:?}",
        start.elapsed()
    );
    assert_eq!((rst.src_port, rst.dst_port), (request.src_port, 1024));
    assert_eof(&mut client);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn host_close_sends_full_shutdown_and_the_guest_rst_completes_the_close() {
    let mut h = Harness::new();
    let (client, host_port) = host_initiated(&mut h, 1024);
    drop(client);
    h.pump_until(WAIT, |r| {
        r.iter()
            .any(|(hd, _)| hd.op == op::SHUTDOWN && hd.flags == SHUTDOWN_BOTH)
    });
    let rst = h.guest_header(op::RST, 1024, host_port);
    h.send(&rst, &[]);
    assert_eq!(h.muxer.connection_count(), 0);
    assert!(
        h.received.iter().all(|(hd, _)| hd.op != op::RST),
        "device must not answer the guest's RST"
    );
}

#[test]
fn close_the_guest_never_acknowledges_is_reset_after_the_grace_timeout() {
    let mut h = Harness::with_timeouts(SHORT_TIMEOUTS);
    let (client, host_port) = host_initiated(&mut h, 1024);
    drop(client);
    let (shutdown, _) = h.expect_op(op::SHUTDOWN);
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!((shutdown.src_port, rst.src_port), (host_port, host_port));
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn guest_close_gets_rst_and_the_host_sees_eof_after_pending_data() {
    let mut h = Harness::new();
    let (mut client, host_port) = host_initiated(&mut h, 1024);
    guest_rw(&mut h, 1024, host_port, b"bye");
    let mut shutdown = h.guest_header(op::SHUTDOWN, 1024, host_port);
    shutdown.flags = SHUTDOWN_BOTH;
    h.send(&shutdown, &[]);
    let (rst, _) = h.expect_op(op::RST);
    assert_eq!(rst.src_port, host_port);
    let mut got = Vec::new();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn resetting_connections_closes_host_clients_but_keeps_the_listener() {
    let mut h = Harness::new();
    let (mut client, _) = host_initiated(&mut h, 1024);
    h.muxer.reset_connections();
    assert_eq!(h.muxer.connection_count(), 0);
    assert_eof(&mut client);
    let (_again, _) = host_initiated(&mut h, 1024);
    assert_eq!(h.muxer.connection_count(), 1);
}

/// A guest that acts like Linux: it consumes what it receives and reports
/// its progress with CREDIT_UPDATE once 64 KiB are freed, and it sends only
/// within the device's credit. 8 MiB go each way, checked byte for byte.
#[test]
fn bulk_transfer_both_ways_with_credit_flow_arrives_intact() {
    const TOTAL: usize = 8 << 20;
    let pattern = |at: usize| (at % 253) as u8;
    let mut h = Harness::new();
    let (client, host_port) = host_initiated(&mut h, 1024);
    h.received.clear();
    let mut writer_side = client.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        writer_side.write_all(&data).unwrap();
    });
    let reader = std::thread::spawn(move || {
        let mut client = client;
        let mut got = vec![0u8; TOTAL];
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        client.read_exact(&mut got).unwrap();
        got
    });

    let mut consumed = 0usize;
    let mut reported = 0usize;
    let mut sent = 0usize;
    let mut device_fwd_cnt = 0usize;
    let start = Instant::now();
    while consumed < TOTAL || sent < TOTAL {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stalled: consumed {consumed}, sent {sent}"
        );
        h.pump();
        for (header, data) in h.received.drain(..) {
            assert_ne!(header.op, op::RST, "connection reset during transfer");
            device_fwd_cnt = device_fwd_cnt.max(header.fwd_cnt as usize);
            if header.op == op::RW {
                assert!(
                    data.iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern(consumed + i)),
                    "host-to-guest data corrupted near byte {consumed}"
                );
                consumed += data.len();
            }
        }
        if consumed - reported >= 64 * 1024 || (consumed == TOTAL && reported < TOTAL) {
            let mut update = h.guest_header(op::CREDIT_UPDATE, 1024, host_port);
            update.fwd_cnt = consumed as u32;
            h.post_tx(&update, &[]);
            reported = consumed;
        }
        // Send within credit, a few packets per round.
        for _ in 0..4 {
            let credit = CONN_BUF_ALLOC as usize - (sent - device_fwd_cnt.min(sent));
            let len = credit.min(MAX_PKT_PAYLOAD).min(TOTAL - sent);
            if len == 0 {
                break;
            }
            let data: Vec<u8> = (sent..sent + len).map(pattern).collect();
            let mut header = h.guest_header(op::RW, 1024, host_port);
            header.fwd_cnt = reported as u32;
            h.post_tx(&header, &data);
            sent += len;
        }
        h.pump();
    }
    writer.join().unwrap();
    let got = reader.join().unwrap();
    assert!(
        got.iter().enumerate().all(|(at, &b)| b == pattern(at)),
        "guest-to-host data corrupted"
    );
}

#[test]
fn busy_connections_share_the_rx_queue_round_robin() {
    let mut h = Harness::new();
    let (mut a, port_a) = host_initiated(&mut h, 1001);
    let (mut b, port_b) = host_initiated(&mut h, 1002);
    h.received.clear();
    let blob = vec![9u8; 128 * 1024];
    a.write_all(&blob).unwrap();
    b.write_all(&blob).unwrap();
    h.pump_until(WAIT, |r| {
        r.iter().filter(|(hd, _)| hd.op == op::RW).count() >= 40
    });
    let order: Vec<u32> = h
        .received
        .iter()
        .filter(|(hd, _)| hd.op == op::RW)
        .map(|(hd, _)| hd.src_port)
        .take(40)
        .collect();
    let from_a = order.iter().filter(|&&p| p == port_a).count();
    let from_b = order.iter().filter(|&&p| p == port_b).count();
    assert!(
        from_a >= 15 && from_b >= 15,
        "unfair rx sharing: {from_a} vs {from_b} in {order:?}"
    );
}

#[test]
fn thousand_host_connections_all_complete_and_relay_data_both_ways() {
    const CONNECTIONS: usize = 1000;
    let mut h = Harness::new();
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        let mut client = UnixStream::connect(&h.uds_path).unwrap();
        client
            .write_all(format!("CONNECT {}\n", 2000 + i).as_bytes())
            .unwrap();
        clients.push(client);
        if i % 64 == 0 {
            // Keep the listener's backlog short.
            h.pump();
        }
    }
    // The guest accepts every REQUEST it sees.
    let mut accepted = std::collections::HashMap::new();
    let start = Instant::now();
    while accepted.len() < CONNECTIONS {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {} of {CONNECTIONS} requests arrived",
            accepted.len()
        );
        h.pump();
        let requests: Vec<PacketHeader> = h
            .received
            .drain(..)
            .filter(|(hd, _)| hd.op == op::REQUEST)
            .map(|(hd, _)| hd)
            .collect();
        for request in requests {
            accepted.insert(request.dst_port, request.src_port);
            let response = h.guest_header(op::RESPONSE, request.dst_port, request.src_port);
            h.send(&response, &[]);
        }
    }
    assert_eq!(h.muxer.connection_count(), CONNECTIONS);
    // Every client got its OK and sends a greeting naming itself.
    for (i, client) in clients.iter_mut().enumerate() {
        let guest_port = 2000 + i as u32;
        assert_eq!(read_line(client), format!("OK {}\n", accepted[&guest_port]));
        client
            .write_all(format!("from {guest_port}").as_bytes())
            .unwrap();
    }
    let mut greetings = std::collections::HashMap::new();
    let start = Instant::now();
    while greetings.len() < CONNECTIONS {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {} greetings arrived",
            greetings.len()
        );
        h.pump();
        for (hd, data) in h.received.drain(..) {
            if hd.op == op::RW {
                greetings
                    .entry(hd.dst_port)
                    .or_insert_with(Vec::new)
                    .extend_from_slice(&data);
            }
        }
        greetings.retain(|_, d| !d.is_empty());
        std::thread::sleep(Duration::from_millis(1));
    }
    for (port, data) in &greetings {
        assert_eq!(data, format!("from {port}").as_bytes());
    }
    // The guest answers each one; each client reads its own answer.
    for (guest_port, host_port) in &accepted {
        guest_rw(
            &mut h,
            *guest_port,
            *host_port,
            format!("to {guest_port}").as_bytes(),
        );
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let expected = format!("to {}", 2000 + i);
        let mut got = vec![0u8; expected.len()];
        client.set_read_timeout(Some(WAIT)).unwrap();
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, expected.as_bytes());
    }
}

// ---- MMIO adapter ----------------------------------------------------------

#[derive(Default)]
struct CountingInterrupt {
    used: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn device_config(dir: &TestDir) -> VsockConfig {
    VsockConfig::new(0x1_0000_0003 & 0xffff_ffff, dir.path().join("dev.sock"))
}

#[test]
fn mmio_device_reports_type_queues_and_guest_cid_in_config_space() {
    let dir = TestDir::new("vsock").unwrap();
    let config = VsockConfig::new(0x0102_0304, dir.path().join("dev.sock"));
    let device = VsockDevice::new(config).unwrap();
    assert_eq!(device.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(device.queue_max_sizes().len(), 3);
    let mut cid = [0u8; 8];
    device.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x0102_0304);
    let mut high = [0xffu8; 4];
    device.read_config(4, &mut high);
    assert_eq!(high, [0, 0, 0, 0]);
}

#[test]
fn reserved_guest_cids_are_refused() {
    let dir = TestDir::new("vsock").unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        let config = VsockConfig::new(cid, dir.path().join("x.sock"));
        assert!(VsockDevice::new(config).is_err(), "cid {cid} accepted");
    }
}

#[test]
fn mmio_device_worker_delivers_a_request_and_stops_on_reset() {
    let dir = TestDir::new("vsock").unwrap();
    let config = device_config(&dir);
    let uds_path = config.uds_path.clone();
    let mut device = VsockDevice::new(config).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x2000);
    let tx = DriverQueue::new(&mem, rx.end(), 16, 0x2000);
    let event = DriverQueue::new(&mem, tx.end(), 16, 0x100);
    for _ in 0..8 {
        rx.add_chain(&mem, &[(0x2000, true, &[])]).unwrap();
    }
    let rx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let queues = vec![
        ActivatedQueue {
            queue: rx.device_queue(),
            notifier: rx_notify.try_clone().unwrap(),
        },
        ActivatedQueue {
            queue: tx.device_queue(),
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        },
        ActivatedQueue {
            queue: event.device_queue(),
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        },
    ];
    let interrupt = Arc::new(CountingInterrupt::default());
    device
        .activate(mem.clone(), interrupt.clone(), queues)
        .unwrap();
    assert!(device.is_active());

    let mut client = UnixStream::connect(&uds_path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let start = Instant::now();
    let request = loop {
        if let Some((_, _, data)) = rx.pop_used(&mem) {
            break PacketHeader::decode(data[..HDR_LEN].try_into().unwrap());
        }
        assert!(start.elapsed() < WAIT, "no REQUEST from the worker thread");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(
        (request.op, request.dst_port, request.dst_cid),
        (op::REQUEST, 1024, 3)
    );
    assert!(interrupt.used.load(Ordering::SeqCst) >= 1);

    device.reset();
    assert!(!device.is_active());
    // The worker closed its connections; the listening socket stays.
    assert_eof(&mut client);
    assert!(UnixStream::connect(&uds_path).is_ok());
    drop(device);
    assert!(!uds_path.exists(), "dropping the device removes its socket");
}

#[test]
fn an_mmio_worker_serves_what_the_driver_posted_before_it_started() {
    // A packet posted and notified while no worker ran (before DRIVER_OK,
    // or while a paused worker was stopped) must not wait for a kick that
    // came already: the worker's first pass serves it.
    let dir = TestDir::new("vsock").unwrap();
    let mut device = VsockDevice::new(device_config(&dir)).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x2000);
    let mut tx = DriverQueue::new(&mem, rx.end(), 16, 0x2000);
    let event = DriverQueue::new(&mem, tx.end(), 16, 0x100);
    for _ in 0..4 {
        rx.add_chain(&mem, &[(0x2000, true, &[])]).unwrap();
    }
    // A REQUEST to a host port nobody listens on: the answer is an RST.
    let request = PacketHeader {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 9999,
        len: 0,
        type_: packet::TYPE_STREAM,
        op: op::REQUEST,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
    .encode();
    tx.add_chain(&mem, &[(HDR_LEN as u32, false, &request)])
        .unwrap();
    // No notifier is ever written.
    let queues = [rx.device_queue(), tx.device_queue(), event.device_queue()]
        .into_iter()
        .map(|queue| ActivatedQueue {
            queue,
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        })
        .collect();
    device
        .activate(mem.clone(), Arc::new(CountingInterrupt::default()), queues)
        .unwrap();
    let start = Instant::now();
    let reply = loop {
        if let Some((_, _, data)) = rx.pop_used(&mem) {
            break PacketHeader::decode(data[..HDR_LEN].try_into().unwrap());
        }
        assert!(
            start.elapsed() < WAIT,
            "the posted REQUEST was never served"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!((reply.op, reply.dst_port), (op::RST, 5000));
    device.reset();
}

#[test]
fn a_paused_mmio_device_keeps_its_connections_and_goes_on_from_its_queue_positions() {
    let dir = TestDir::new("vsock").unwrap();
    let config = device_config(&dir);
    let uds_path = config.uds_path.clone();
    let mut device = VsockDevice::new(config).unwrap();
    assert!(
        device.pause().is_err(),
        "a device that never ran has nothing to pause"
    );
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x2000);
    let tx = DriverQueue::new(&mem, rx.end(), 16, 0x2000);
    let event = DriverQueue::new(&mem, tx.end(), 16, 0x100);
    for _ in 0..8 {
        rx.add_chain(&mem, &[(0x2000, true, &[])]).unwrap();
    }
    let notifiers: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let activated = |queues: [Queue; 3]| -> Vec<ActivatedQueue> {
        queues
            .into_iter()
            .zip(&notifiers)
            .map(|(queue, notifier)| ActivatedQueue {
                queue,
                notifier: notifier.try_clone().unwrap(),
            })
            .collect()
    };
    let interrupt = Arc::new(CountingInterrupt::default());
    device
        .activate(
            mem.clone(),
            interrupt.clone(),
            activated([rx.device_queue(), tx.device_queue(), event.device_queue()]),
        )
        .unwrap();
    let wait_for_request = |rx: &mut DriverQueue, port: u32| {
        let start = Instant::now();
        loop {
            if let Some((_, _, data)) = rx.pop_used(&mem) {
                let request = PacketHeader::decode(data[..HDR_LEN].try_into().unwrap());
                assert_eq!((request.op, request.dst_port), (op::REQUEST, port));
                return;
            }
            assert!(start.elapsed() < WAIT, "no REQUEST for port {port}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let mut first = UnixStream::connect(&uds_path).unwrap();
    first.write_all(b"CONNECT 1024\n").unwrap();
    wait_for_request(&mut rx, 1024);

    let positions = device.pause().unwrap();
    assert!(!device.is_active());
    assert_eq!(positions.len(), 3);
    assert_eq!(
        (positions[0].next_avail, positions[0].next_used),
        (1, 1),
        "one rx buffer was used for the REQUEST"
    );
    // The host client is still connected: no EOF while paused.
    first.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let pending = first.read(&mut byte).unwrap_err();
    assert_eq!(pending.kind(), std::io::ErrorKind::WouldBlock);

    let restored: Vec<Queue> = positions
        .into_iter()
        .map(|state| Queue::try_from(state).unwrap())
        .collect();
    let restored: [Queue; 3] = restored.try_into().unwrap();
    device
        .activate(mem.clone(), interrupt.clone(), activated(restored))
        .unwrap();
    let mut second = UnixStream::connect(&uds_path).unwrap();
    second.write_all(b"CONNECT 1025\n").unwrap();
    // The next REQUEST lands in the next used slot, not over the first.
    wait_for_request(&mut rx, 1025);
    let still_pending = first.read(&mut byte).unwrap_err();
    assert_eq!(
        still_pending.kind(),
        std::io::ErrorKind::WouldBlock,
        "the connection made before the pause survives the resume"
    );
    device.reset();
    first.set_nonblocking(false).unwrap();
    assert_eof(&mut first);
}

// ---- vhost-user adapter -----------------------------------------------------

#[test]
fn vhost_user_server_creates_both_sockets_and_stop_removes_them() {
    let dir = TestDir::new("vsock").unwrap();
    let socket = dir.path().join("vhost.sock");
    let config = VsockConfig::new(3, dir.path().join("vsock.sock"));
    // Not what the umask (022 for tests) would give (0755): 0600.
    let server = super::serve_vhost_user(&socket, config.clone()).unwrap();
    assert!(socket.exists() && config.uds_path.exists());
    use std::os::unix::fs::PermissionsExt;
    for path in [&socket, &config.uds_path] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    // A host client can already queue up before any guest exists.
    let _early = UnixStream::connect(&config.uds_path).unwrap();
    server.stop();
    assert!(!socket.exists() && !config.uds_path.exists());
}

#[test]
fn vhost_user_server_stop_disconnects_a_connected_frontend() {
    let dir = TestDir::new("vsock").unwrap();
    let socket = dir.path().join("vhost.sock");
    let config = VsockConfig::new(3, dir.path().join("vsock.sock"));
    let server = super::serve_vhost_user(&socket, config).unwrap();
    let mut frontend = UnixStream::connect(&socket).unwrap();
    // Let the server accept and start its daemon.
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    server.stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        start.elapsed()
    );
    assert_eof(&mut frontend);
}

/// Connects a vhost-user frontend to `socket`, negotiates features as QEMU
/// does and returns the guest CID read from the config space. The
/// frontend's reads retry on timeouts, so the session runs on its own
/// thread and a server that never answers fails the test after [`WAIT`].
fn negotiate_as_frontend(socket: &std::path::Path) -> u64 {
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserVirtioFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;

    let socket = socket.to_owned();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut frontend = Frontend::connect(&socket, 3).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        let wanted = crate::VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(features & wanted, wanted, "features {features:#x}");
        frontend.set_features(wanted).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        let (_, cid) = frontend
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .unwrap();
        let _ = done.send(u64::from_le_bytes(cid[..8].try_into().unwrap()));
        // Dropping the frontend hangs up, as QEMU does when it exits.
    });
    result
        .recv_timeout(WAIT)
        .expect("the server completes the frontend's negotiation")
}

/// QEMU reconnects after a guest reboot or its own restart: once a frontend
/// has hung up, the next one gets a full session from the same server.
#[test]
fn vhost_user_server_survives_a_frontend_that_disconnects() {
    let dir = TestDir::new("vsock").unwrap();
    let socket = dir.path().join("vhost.sock");
    let config = VsockConfig::new(5, dir.path().join("vsock.sock"));
    let server = super::serve_vhost_user(&socket, config).unwrap();
    assert_eq!(
        negotiate_as_frontend(&socket),
        5,
        "the first frontend reads the guest CID"
    );
    assert_eq!(
        negotiate_as_frontend(&socket),
        5,
        "a frontend connecting after the first hung up gets a full session"
    );
    assert!(!server.is_finished(), "the server still runs");
    let start = Instant::now();
    server.stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        start.elapsed()
    );
    assert!(!socket.exists(), "stop removes the socket");
}

/// Plays QEMU's part: negotiates with the server over vhost-user, shares a
/// memfd as guest memory and drives the rings as the guest driver would.
#[test]
fn vhost_user_frontend_negotiates_and_relays_a_host_connection_end_to_end() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use vhost::vhost_user::message::{
        VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    };
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vm_memory::{FileOffset, GuestMemory, GuestMemoryRegion};

    const MEM: usize = 8 << 20;
    let dir = TestDir::new("vsock").unwrap();
    let socket = dir.path().join("vhost.sock");
    let config = VsockConfig::new(7, dir.path().join("vsock.sock"));
    let server = super::serve_vhost_user(&socket, config.clone()).unwrap();

    // SAFETY: plain system call with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"husk-vsock-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh memfd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;

    let mut frontend = Frontend::connect(&socket, 3).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(features & (1 << 32 | protocol), 1 << 32 | protocol);
    frontend.set_features(1 << 32 | protocol).unwrap();
    let protocol_features = frontend.get_protocol_features().unwrap();
    assert!(protocol_features.contains(VhostUserProtocolFeatures::CONFIG));
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    let (_, cid) = frontend
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
        .unwrap();
    assert_eq!(u64::from_le_bytes(cid[..8].try_into().unwrap()), 7);

    let region = mem.iter().next().unwrap();
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: hva(0),
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();

    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x2000);
    let mut tx = DriverQueue::new(&mem, rx.end(), 16, 0x2000);
    let event = DriverQueue::new(&mem, tx.end(), 16, 0x100);
    let kicks: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let calls: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    for (index, queue) in [&rx, &tx, &event].into_iter().enumerate() {
        let (desc, avail, used) = queue.ring_addresses();
        frontend.set_vring_num(index, queue.size()).unwrap();
        frontend
            .set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: queue.size(),
                    queue_size: queue.size(),
                    flags: 0,
                    desc_table_addr: hva(desc),
                    used_ring_addr: hva(used),
                    avail_ring_addr: hva(avail),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(index, 0).unwrap();
        frontend.set_vring_call(index, &calls[index]).unwrap();
        frontend.set_vring_kick(index, &kicks[index]).unwrap();
        frontend.set_vring_enable(index, true).unwrap();
    }
    for _ in 0..8 {
        rx.add_chain(&mem, &[(0x2000, true, &[])]).unwrap();
    }
    kicks[0].write(1).unwrap();

    let next_rx = |rx: &mut DriverQueue| {
        let start = Instant::now();
        loop {
            if let Some((_, _, data)) = rx.pop_used(&mem) {
                let header = PacketHeader::decode(data[..HDR_LEN].try_into().unwrap());
                return (header, data[HDR_LEN..].to_vec());
            }
            assert!(
                start.elapsed() < WAIT,
                "no rx packet from the vhost-user backend"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let guest = |op: u16, src_port: u32, dst_port: u32, len: u32| PacketHeader {
        src_cid: 7,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: 1,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    };

    let mut client = UnixStream::connect(&config.uds_path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let (request, _) = next_rx(&mut rx);
    assert_eq!(
        (request.op, request.dst_cid, request.dst_port),
        (op::REQUEST, 7, 1024)
    );
    assert!(
        calls[0].read().unwrap() >= 1,
        "the backend must signal the rx call eventfd"
    );

    tx.add_chain(
        &mem,
        &[(
            HDR_LEN as u32,
            false,
            &guest(op::RESPONSE, 1024, request.src_port, 0).encode(),
        )],
    )
    .unwrap();
    kicks[1].write(1).unwrap();
    assert_eq!(read_line(&client), format!("OK {}\n", request.src_port));

    client.write_all(b"hello guest").unwrap();
    let (rw, data) = next_rx(&mut rx);
    assert_eq!((rw.op, data.as_slice()), (op::RW, &b"hello guest"[..]));

    tx.add_chain(
        &mem,
        &[
            (
                HDR_LEN as u32,
                false,
                &guest(op::RW, 1024, request.src_port, 10).encode(),
            ),
            (10, false, b"hello host"),
        ],
    )
    .unwrap();
    kicks[1].write(1).unwrap();
    let mut got = [0u8; 10];
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");

    let start = Instant::now();
    server.stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "stop with a live frontend took {:?}",
        start.elapsed()
    );
    assert_eof(&mut client);
}

/// QEMU 7.2's `vhost-user-vsock-device` sets every vring to 1024 entries and
/// cannot be told otherwise; a backend that refuses drops the session, which
/// the next request that wants a reply would see.
#[test]
fn vhost_user_backend_accepts_qemu_vring_size_of_1024() {
    use vhost::vhost_user::message::VhostUserVirtioFeatures;
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    const QEMU_VSOCK_VRING_SIZE: u16 = 1024;
    let dir = TestDir::new("vsock").unwrap();
    let socket = dir.path().join("vhost.sock");
    let config = VsockConfig::new(7, dir.path().join("vsock.sock"));
    let server = super::serve_vhost_user(&socket, config).unwrap();
    let device = VsockDevice::new(device_config(&dir)).unwrap();
    assert!(device
        .queue_max_sizes()
        .iter()
        .all(|&size| size >= QEMU_VSOCK_VRING_SIZE));

    let frontend = Frontend::connect(&socket, 3).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    frontend
        .set_features(features & (1 << 32 | protocol))
        .unwrap();
    for index in 0..3 {
        frontend
            .set_vring_num(index, QEMU_VSOCK_VRING_SIZE)
            .unwrap();
    }
    assert_eq!(
        frontend.get_features().unwrap(),
        features,
        "the backend must keep the session after SET_VRING_NUM 1024"
    );
    server.stop();
}
