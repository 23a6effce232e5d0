//! `vsock_packets`: a sequence of guest tx packets, interleaved with host
//! socket activity, fed to the vsock device model (packet parser,
//! connection state machine, muxer) through real virtqueues.
//!
//! The input is a list of operations, each an opcode byte and its fields:
//!
//! * a guest tx packet: either a raw 44-byte header or one with the guest's
//!   addresses and fields picked from values that matter (service ports,
//!   ports the device announced, honest or arbitrary credit), a payload,
//!   and a descriptor layout (one or several descriptors, split anywhere,
//!   empty descriptors, a device-writable one, a chain shorter than the
//!   header says), once or in a burst of up to 2041 copies;
//! * host activity: a host service writes, reads, half-closes or closes its
//!   stream; a hybrid-vsock client connects and sends a line;
//! * the guest withholds rx buffers (so the device's backlog fills and tx
//!   stalls) or posts odd ones (too short, device-readable, split);
//! * a driver reset (`reset_connections`).
//!
//! Oracle: no panic; every rx packet obeys the virtio-vsock rules
//! ([`check_rx_packet`](crate::vsock_guest::check_rx_packet)); the
//! connection state machine's debug assertions hold (guest bytes held never
//! exceed the advertised window, `rx_cnt - fwd_cnt` matches the bytes
//! buffered, reads never exceed the guest's credit); no file descriptor
//! outlives the model.

use std::io::Write;
use std::net::Shutdown;

use husk_devices::vsock::{CONN_BUF_ALLOC, HOST_CID};

use crate::input::Input;
use crate::vsock_guest::{
    Guest, Header, GUEST_CID, HDR_LEN, MAX_PKT_PAYLOAD, RX_BUF_LEN, SERVICE_PORTS, TYPE_STREAM,
};

/// Guest ports the structured packets use: few, so that packets meet.
const GUEST_PORTS: [u32; 4] = [49152, 49153, 1024, 0];
/// Operations per input; a longer input's tail is ignored.
const MAX_OPS: usize = 512;
/// Payload bytes taken from the input per packet; the rest of a longer
/// payload is whatever the guest memory holds.
const MAX_PAYLOAD_FROM_INPUT: usize = 512;

/// Runs one input.
pub fn vsock_packets(data: &[u8]) {
    let mut input = Input::new(data);
    let mut guest = Guest::new();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            0..=3 => guest_packet(&mut guest, &mut input),
            4 => host_write(&mut guest, &mut input),
            5 => host_read_or_close(&mut guest, &mut input),
            6 => host_connect(&mut guest, &mut input),
            7 => rx_buffers(&mut guest, &mut input),
            8 => {
                guest.host_events();
                guest.pump(true, true);
            }
            _ => {
                if input.u8() & 3 == 0 {
                    guest.reset_connections();
                }
            }
        }
    }
    guest.finish();
}

/// A host port: a service, one the device announced for a host client, an
/// unserved one, or anything.
fn host_port(guest: &Guest, input: &mut Input) -> u32 {
    let pick = input.u8();
    match pick % 8 {
        0..=3 => SERVICE_PORTS[usize::from(pick) % SERVICE_PORTS.len()],
        4 | 5 if !guest.ephemeral_ports.is_empty() => {
            guest.ephemeral_ports[usize::from(pick) % guest.ephemeral_ports.len()]
        }
        6 => 7777,
        _ => input.u32(),
    }
}

/// A credit field: the full window, nothing, a little, or anything.
fn buf_alloc(input: &mut Input) -> u32 {
    match input.u8() % 4 {
        0 => CONN_BUF_ALLOC,
        1 => 0,
        2 => u32::from(input.u16()),
        _ => input.u32(),
    }
}

fn guest_packet(guest: &mut Guest, input: &mut Input) {
    let shape = input.u8();
    let mut header = if shape & 1 == 0 {
        let src_port = input.choose(&GUEST_PORTS);
        let dst_port = host_port(guest, input);
        let op = u16::from(input.u8() % 9);
        let flags = u32::from(input.u8() % 5);
        let buf_alloc = buf_alloc(input);
        // An honest guest reports what it consumed; a hostile one anything.
        let fwd_cnt = if input.u8() & 3 != 0 {
            guest
                .consumed
                .get(&(dst_port, src_port))
                .copied()
                .unwrap_or(0)
        } else {
            input.u32()
        };
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    } else {
        Header::decode(&input.array())
    };
    let payload_len = match input.u8() % 4 {
        0 => 0,
        1 => usize::from(input.u8()),
        2 => usize::from(input.u16()),
        _ => MAX_PKT_PAYLOAD,
    };
    // Only the payload's head comes from the input; the descriptors still
    // span the whole payload, whose tail is whatever guest memory holds
    // (zeros, or an earlier packet's bytes), so long payloads cost no
    // copying.
    let payload_head = input.bytes(payload_len.min(MAX_PAYLOAD_FROM_INPUT));
    if shape & 2 == 0 {
        header.len = payload_len as u32;
    } else {
        header.len = input.u32();
    }
    let mut wire = header.encode().to_vec();
    wire.extend_from_slice(payload_head);
    let mut total = HDR_LEN + payload_len;
    if shape & 0x40 != 0 {
        // A chain shorter than the header says.
        total = usize::from(input.u16()) % total;
    }
    let mut cuts = match (shape >> 2) & 3 {
        0 => vec![],
        1 => vec![HDR_LEN.min(total)],
        2 => vec![usize::from(input.u16()) % (total + 1)],
        _ => {
            let mut cuts: Vec<usize> = (0..4)
                .map(|_| usize::from(input.u16()) % (total + 1))
                .collect();
            cuts.sort_unstable();
            cuts
        }
    };
    cuts.push(total);
    let mut parts: Vec<(u32, bool, &[u8])> = Vec::new();
    if shape & 0x10 != 0 {
        parts.push((0, false, &[]));
    }
    let mut start = 0;
    for cut in cuts {
        if cut > start {
            let data = &wire[start.min(wire.len())..cut.min(wire.len())];
            parts.push(((cut - start) as u32, false, data));
            start = cut;
        }
    }
    if parts.is_empty() {
        parts.push((0, false, &[]));
    }
    if shape & 0x20 != 0 {
        parts.push((64, true, &[]));
    }
    parts.truncate(16);
    // A burst of copies: enough stray packets to fill the device's
    // backlog of RSTs when the guest withholds rx buffers.
    let copies = if shape & 0x80 != 0 {
        1 + usize::from(input.u8()) * 8
    } else {
        1
    };
    for _ in 0..copies {
        if !guest.post_tx(&parts) {
            break;
        }
    }
    guest.pump(true, true);
}

/// A host stream of this input, picked by the next byte.
fn pick_peer(guest: &Guest, input: &mut Input) -> Option<usize> {
    let pick = usize::from(input.u8());
    (!guest.peers.is_empty()).then(|| pick % guest.peers.len())
}

fn host_write(guest: &mut Guest, input: &mut Input) {
    let Some(index) = pick_peer(guest, input) else {
        return;
    };
    let len = usize::from(input.u16()) % (64 * 1024);
    let seed = input.u8();
    let bytes: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
    let _ = guest.peers[index].stream.write(&bytes);
    guest.host_events();
}

fn host_read_or_close(guest: &mut Guest, input: &mut Input) {
    let action = input.u8() % 4;
    let Some(index) = pick_peer(guest, input) else {
        return;
    };
    match action {
        0 => {
            guest.read_peer(index);
        }
        1 => {
            let _ = guest.peers[index].stream.shutdown(Shutdown::Write);
        }
        2 => {
            let _ = guest.peers[index].stream.shutdown(Shutdown::Read);
        }
        _ => {
            guest.peers.swap_remove(index);
        }
    }
    guest.host_events();
}

fn host_connect(guest: &mut Guest, input: &mut Input) {
    let line = match input.u8() % 3 {
        0 => format!("CONNECT {}\n", input.choose(&GUEST_PORTS)).into_bytes(),
        1 => {
            let mut line = format!("CONNECT {}\n", input.choose(&GUEST_PORTS)).into_bytes();
            let extra = usize::from(input.u8() % 64);
            line.extend_from_slice(input.bytes(extra));
            line
        }
        _ => {
            let len = usize::from(input.u8() % 48);
            input.bytes(len).to_vec()
        }
    };
    guest.connect_host_client(&line);
    guest.host_events();
}

fn rx_buffers(guest: &mut Guest, input: &mut Input) {
    match input.u8() % 5 {
        0 => guest.withhold_rx = !guest.withhold_rx,
        1 => {
            guest.post_rx(&[(u32::from(input.u8()) % HDR_LEN as u32, true)]);
        }
        2 => {
            guest.post_rx(&[(RX_BUF_LEN, false)]);
        }
        3 => {
            let first = u32::from(input.u8());
            guest.post_rx(&[(first, true), (RX_BUF_LEN - first.min(RX_BUF_LEN), true)]);
        }
        _ => {
            guest.post_rx(&[(16, true), (16, true), (16, true), (RX_BUF_LEN, true)]);
        }
    }
    guest.pump(false, true);
}
