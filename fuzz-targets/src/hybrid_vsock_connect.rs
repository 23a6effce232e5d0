//! `hybrid_vsock_connect`: both ends of the hybrid-vsock handshake.
//!
//! * The device's side: a host client connects to the vsock Unix socket
//!   and sends the input; the muxer parses the `CONNECT <port>\n` line.
//!   Oracle, against the protocol: a complete line within the first 32
//!   bytes that reads `CONNECT <u32>` (surrounding whitespace and one `\r`
//!   allowed) makes the device send the guest exactly one REQUEST for that
//!   port, and once the guest answers, the client reads `OK <host port>\n`
//!   and every byte it sent after the line reaches the guest, in order;
//!   any other complete line, or 32 bytes without a newline, closes the
//!   client and tells the guest nothing; a shorter partial line waits.
//! * The shim's side: `husk_agent_client::hybrid_vsock_connect` against a
//!   fake device that answers with the input. Oracle: the connection is
//!   accepted exactly when the reply's first line ends in a newline within
//!   the first 64 bytes and reads `OK <u32>`, and then the stream carries
//!   exactly the bytes after that newline.

use std::io::{ErrorKind, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::vsock_guest::{op, Guest, Header, FIRST_EPHEMERAL_PORT};

/// Bytes of a host client's line the device looks at.
const MAX_CONNECT_LINE: usize = 32;
/// Bytes of the device's answer the client reads before giving up.
const MAX_REPLY_LINE: usize = 64;

/// Runs one input through both sides.
pub fn hybrid_vsock_connect(data: &[u8]) {
    device_side(data);
    client_side(data);
}

/// What the protocol says a device does with a client's first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    /// Forward to this guest port; the line is this long (with `\n`).
    Connect { port: u32, line_len: usize },
    /// Close the client.
    Refuse,
    /// Wait for the rest of the line.
    Wait,
}

fn expected_handshake(sent: &[u8]) -> Expected {
    let window = &sent[..sent.len().min(MAX_CONNECT_LINE)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if window.len() >= MAX_CONNECT_LINE {
            Expected::Refuse
        } else {
            Expected::Wait
        };
    };
    let line = &window[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(port) = line
        .strip_prefix(b"CONNECT ")
        .and_then(|port| std::str::from_utf8(port).ok())
        .and_then(|port| port.trim().parse::<u32>().ok())
    else {
        return Expected::Refuse;
    };
    Expected::Connect {
        port,
        line_len: newline + 1,
    }
}

fn device_side(sent: &[u8]) {
    if sent.is_empty() {
        return;
    }
    let mut guest = Guest::new();
    let client = guest.connect_host_client(sent);
    guest.host_events();
    let expected = expected_handshake(sent);
    let requests: Vec<Header> = guest.received.iter().map(|(h, _)| *h).collect();
    match expected {
        Expected::Connect { port, line_len } => {
            assert_eq!(
                requests.len(),
                1,
                "{sent:?} should make exactly one REQUEST, the guest got {requests:?}"
            );
            let request = requests[0];
            assert_eq!(request.op, op::REQUEST, "{request:?}");
            assert_eq!(request.dst_port, port, "{request:?}");
            assert!(request.src_port >= FIRST_EPHEMERAL_PORT, "{request:?}");
            guest.received.clear();
            let response = Header::guest(op::RESPONSE, port, request.src_port);
            guest.send(&response, &[]);
            // The answer, then the client's early bytes delivered to the guest.
            let reply = guest.read_peer(client).unwrap_or_default();
            assert_eq!(
                reply,
                format!("OK {}\n", request.src_port).into_bytes(),
                "the client's answer to {sent:?}"
            );
            let early = &sent[line_len..];
            let mut delivered = Vec::new();
            for _ in 0..64 {
                guest.host_events();
                for (header, payload) in guest.received.drain(..) {
                    assert_eq!(header.src_port, request.src_port, "{header:?}");
                    if header.op == op::RW {
                        delivered.extend_from_slice(&payload);
                    }
                }
                if delivered.len() >= early.len() {
                    break;
                }
            }
            assert_eq!(
                delivered, early,
                "the bytes after the CONNECT line must reach the guest unchanged"
            );
        }
        Expected::Refuse => {
            assert!(
                requests.is_empty(),
                "{sent:?} must not reach the guest: {requests:?}"
            );
            assert_eq!(
                client_state(&mut guest, client),
                ClientState::Closed,
                "the device must close a client that sent {sent:?}"
            );
        }
        Expected::Wait => {
            assert!(
                requests.is_empty(),
                "{sent:?} is not a full line yet: {requests:?}"
            );
            assert_eq!(
                client_state(&mut guest, client),
                ClientState::Open,
                "the device must wait for the rest of {sent:?}"
            );
        }
    }
    guest.finish();
}

#[derive(Debug, PartialEq, Eq)]
enum ClientState {
    Open,
    Closed,
}

fn client_state(guest: &mut Guest, index: usize) -> ClientState {
    let mut byte = [0u8; 1];
    match guest.peers[index].stream.read(&mut byte) {
        Ok(0) => ClientState::Closed,
        Err(e) if e.kind() == ErrorKind::WouldBlock => ClientState::Open,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => ClientState::Closed,
        other => panic!("the device wrote to a client it did not accept: {other:?}"),
    }
}

/// What the protocol says the client makes of the device's answer: the
/// bytes after the accepted line, or None for a refusal.
fn expected_reply(reply: &[u8]) -> Option<&[u8]> {
    let window = &reply[..reply.len().min(MAX_REPLY_LINE + 1)];
    let newline = window.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&window[..newline]);
    let port = line.strip_prefix("OK ")?;
    port.trim().parse::<u32>().ok()?;
    Some(&reply[newline + 1..])
}

fn client_side(reply: &[u8]) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = client_dir();
    let uds = dir.join(format!("d{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime");
    let outcome = runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(&uds).expect("cannot bind the fake device");
        let answer = reply.to_vec();
        let device = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            // Answer at once and close our side, then read the request.
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
            let mut request = Vec::new();
            let _ = stream.read_to_end(&mut request).await;
            request
        });
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            husk_agent_client::hybrid_vsock_connect(&uds, 1024),
        )
        .await
        .expect("the client hung on a device that closed its side");
        let outcome = match connected {
            Ok(mut stream) => {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                drop(stream);
                Some(rest)
            }
            Err(_) => None,
        };
        let request = device.await.expect("the fake device panicked");
        assert_eq!(request, b"CONNECT 1024\n", "the client's request");
        outcome
    });
    let _ = std::fs::remove_file(&uds);
    let expected = expected_reply(reply);
    assert_eq!(
        outcome.as_deref(),
        expected,
        "the client's reading of the device's answer {reply:?}"
    );
}

fn client_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| crate::process_dir("fuzz-hvsock"))
        .clone()
}
