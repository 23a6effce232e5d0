//! The client side of CRI's streaming server, as `kubectl exec` and
//! `kubectl port-forward` reach it through kubelet: the URL `Exec` or
//! `PortForward` returns is opened as a WebSocket with the
//! `v4.channel.k8s.io` subprotocol, whose binary messages each start with
//! a channel byte. Exec: 1 stdout, 2 stderr, 3 the exec's final status as
//! a JSON `metav1.Status`. Port-forward of one port: 0 data, 1 errors,
//! each opened by the port number (two bytes, little-endian).
//!
//! Only what the CRI tier needs: an HTTP/1.1 upgrade over plain TCP (the
//! streaming server listens on loopback), unmasked server frames read and
//! reassembled, pings answered, no exec stdin. Every error names the step.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;

/// The subprotocol kubelet's streaming library speaks for exec.
const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
/// How long a streamed exec may run before the client gives up.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest message the client accepts (a stream's chunk, or a status).
const MAX_MESSAGE_BYTES: usize = 1 << 20;

const STDOUT_CHANNEL: u8 = 1;
const STDERR_CHANNEL: u8 = 2;
const STATUS_CHANNEL: u8 = 3;

/// What a streamed exec produced.
#[derive(Debug, Default)]
pub struct StreamedExec {
    pub stdout: String,
    pub stderr: String,
    /// The exit code the final status gives (0 for `Success`).
    pub exit_code: i32,
}

/// Opens `url` (from CRI `Exec` with stdout and stderr, no stdin, no
/// TTY) and collects the exec's output and exit code.
pub fn run_exec(url: &str) -> Result<StreamedExec> {
    let (mut reader, mut writer) = open_stream(url)?;

    let mut result = StreamedExec::default();
    let mut status = None;
    let started = Instant::now();
    loop {
        ensure!(
            started.elapsed() < STREAM_TIMEOUT,
            "the streamed exec did not end within {STREAM_TIMEOUT:?}"
        );
        let Some((opcode, payload)) = read_message(&mut reader, &mut writer)? else {
            break;
        };
        if opcode == Opcode::Close {
            break;
        }
        let Some((&channel, data)) = payload.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(data);
        match channel {
            STDOUT_CHANNEL => result.stdout.push_str(&text),
            STDERR_CHANNEL => result.stderr.push_str(&text),
            STATUS_CHANNEL if !data.is_empty() => status = Some(text.into_owned()),
            _ => {}
        }
    }
    let status = status.context("the stream ended without the exec's status")?;
    result.exit_code = exit_code_of(&status)?;
    Ok(result)
}

/// What a port-forward stream carried back.
#[derive(Debug, Default)]
pub struct PortForwarded {
    /// The bytes the pod's port sent.
    pub data: Vec<u8>,
    /// The text of the error channel (empty when the forward succeeded).
    pub error: String,
}

/// Opens `url` (from CRI `PortForward` of one `port`), checks the port
/// headers of its data and error channels, sends `request` on the data
/// channel and collects both channels until the server closes.
pub fn run_port_forward(url: &str, port: u16, request: &[u8]) -> Result<PortForwarded> {
    let (mut reader, mut writer) = open_stream(url)?;

    let mut result = PortForwarded::default();
    // Each channel's first message is the port it serves, little-endian.
    let mut headers = [false; 2];
    let mut sent = false;
    let started = Instant::now();
    loop {
        ensure!(
            started.elapsed() < STREAM_TIMEOUT,
            "the port-forward stream did not end within {STREAM_TIMEOUT:?}"
        );
        let Some((opcode, payload)) = read_message(&mut reader, &mut writer)? else {
            break;
        };
        if opcode == Opcode::Close {
            break;
        }
        let Some((&channel, data)) = payload.split_first() else {
            continue;
        };
        let index = usize::from(channel);
        ensure!(index < 2, "a message on channel {channel}, not 0 or 1");
        if !headers[index] {
            ensure!(
                data == port.to_le_bytes(),
                "channel {channel} opened with {data:?}, not port {port}"
            );
            headers[index] = true;
        } else if index == 0 {
            result.data.extend_from_slice(data);
        } else {
            result.error.push_str(&String::from_utf8_lossy(data));
        }
        if headers == [true, true] && !sent {
            let mut message = vec![0u8];
            message.extend_from_slice(request);
            send_frame(&mut writer, 0x2, &message)?;
            sent = true;
        }
    }
    ensure!(
        headers == [true, true],
        "the stream ended before both channels named their port"
    );
    Ok(result)
}

/// Connects to the streaming server `url` names and upgrades to a
/// WebSocket: the reader and writer of the stream.
fn open_stream(url: &str) -> Result<(BufReader<TcpStream>, TcpStream)> {
    let (host_port, path) = split_url(url)?;
    let stream = TcpStream::connect(host_port)
        .with_context(|| format!("cannot connect to the streaming server {host_port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    upgrade(&mut reader, &mut writer, host_port, path)?;
    Ok((reader, writer))
}

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("the streaming URL {url:?} is not plain http"))?;
    let slash = rest
        .find('/')
        .with_context(|| format!("the streaming URL {url:?} has no path"))?;
    Ok((&rest[..slash], &rest[slash..]))
}

/// The HTTP/1.1 WebSocket upgrade; fails unless the server switched
/// protocols to [`CHANNEL_PROTOCOL`].
fn upgrade(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    host: &str,
    path: &str,
) -> Result<()> {
    let mut nonce = [0u8; 16];
    for (i, byte) in nonce.iter_mut().enumerate() {
        *byte = (std::process::id() as u8).wrapping_add((i as u8).wrapping_mul(37));
    }
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {CHANNEL_PROTOCOL}\r\nOrigin: http://{host}\r\n\r\n"
    );
    writer
        .write_all(request.as_bytes())
        .context("sending the WebSocket upgrade")?;
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .context("reading the upgrade's status line")?;
    let mut protocol = None;
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("reading the upgrade's headers")?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                protocol = Some(value.trim().to_owned());
            }
        }
    }
    ensure!(
        status_line.starts_with("HTTP/1.1 101"),
        "the streaming server refused the upgrade: {}",
        status_line.trim()
    );
    ensure!(
        protocol.as_deref() == Some(CHANNEL_PROTOCOL),
        "the streaming server chose the subprotocol {protocol:?}, not {CHANNEL_PROTOCOL}"
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Result<Self> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xa => Self::Pong,
            other => bail!("a WebSocket frame with the reserved opcode {other:#x}"),
        })
    }
}

/// Reads one whole message (continuations joined), answering pings on
/// the way. `None` when the connection closed between messages.
fn read_message(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> Result<Option<(Opcode, Vec<u8>)>> {
    let mut message: Option<(Opcode, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 2];
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(error)
                if error.kind() == std::io::ErrorKind::UnexpectedEof && message.is_none() =>
            {
                return Ok(None)
            }
            Err(error) => return Err(error).context("reading a WebSocket frame header"),
        }
        let fin = head[0] & 0x80 != 0;
        let opcode = Opcode::from_bits(head[0] & 0x0f)?;
        ensure!(head[1] & 0x80 == 0, "the server masked a frame");
        let len = match head[1] & 0x7f {
            126 => {
                let mut bytes = [0u8; 2];
                reader.read_exact(&mut bytes)?;
                u64::from(u16::from_be_bytes(bytes))
            }
            127 => {
                let mut bytes = [0u8; 8];
                reader.read_exact(&mut bytes)?;
                u64::from_be_bytes(bytes)
            }
            short => u64::from(short),
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        ensure!(
            len <= MAX_MESSAGE_BYTES,
            "a WebSocket frame of {len} bytes, above {MAX_MESSAGE_BYTES}"
        );
        let mut payload = vec![0u8; len];
        reader
            .read_exact(&mut payload)
            .context("reading a WebSocket frame")?;
        match opcode {
            Opcode::Ping => send_frame(writer, 0xa, &payload)?,
            Opcode::Pong => {}
            Opcode::Close => return Ok(Some((Opcode::Close, payload))),
            Opcode::Continuation => {
                let (_, data) = message
                    .as_mut()
                    .context("a continuation frame with no message to continue")?;
                data.extend_from_slice(&payload);
                ensure!(
                    data.len() <= MAX_MESSAGE_BYTES,
                    "a WebSocket message above {MAX_MESSAGE_BYTES} bytes"
                );
            }
            Opcode::Text | Opcode::Binary => message = Some((opcode, payload)),
        }
        if fin && message.is_some() && !matches!(opcode, Opcode::Ping | Opcode::Pong) {
            return Ok(message);
        }
    }
}

/// Sends one masked client frame of at most 64 KiB.
fn send_frame(writer: &mut TcpStream, opcode: u8, payload: &[u8]) -> Result<()> {
    let mask = [0x5a, 0x17, 0xc3, 0x88];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        short @ 0..=125 => frame.push(0x80 | short as u8),
        long => {
            let long = u16::try_from(long).context("a client frame above 64 KiB")?;
            frame.push(0x80 | 126);
            frame.extend_from_slice(&long.to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    writer
        .write_all(&frame)
        .context("sending a WebSocket frame")
}

/// The exit code a `metav1.Status` gives: 0 for `Success`, the
/// `ExitCode` cause of a `NonZeroExitCode` failure.
fn exit_code_of(status: &str) -> Result<i32> {
    let value: serde_json::Value = serde_json::from_str(status)
        .with_context(|| format!("the exec's status is not JSON: {status:?}"))?;
    match value["status"].as_str() {
        Some("Success") => Ok(0),
        Some("Failure") if value["reason"] == "NonZeroExitCode" => value["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|cause| cause["reason"] == "ExitCode")
            .and_then(|cause| cause["message"].as_str())
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("a NonZeroExitCode status without its code: {status}")),
        _ => bail!("the exec failed: {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_give_their_exit_codes_and_failures_their_text() {
        assert_eq!(
            exit_code_of(r#"{"metadata":{},"status":"Success"}"#).unwrap(),
            0
        );
        let failure = r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_code_of(failure).unwrap(), 3);
        let error = exit_code_of(r#"{"status":"Failure","message":"no such container"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no such container"), "{error}");
    }

    #[test]
    fn urls_split_into_address_and_path_or_name_what_is_wrong() {
        assert_eq!(
            split_url("http://127.0.0.1:4321/exec/abc").unwrap(),
            ("127.0.0.1:4321", "/exec/abc")
        );
        let error = split_url("https://x/exec").unwrap_err().to_string();
        assert!(error.contains("not plain http"), "{error}");
    }
}
