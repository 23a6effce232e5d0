//! The host side of hybrid vsock, as guest-tier tests use it: a host client
//! connects to the device's Unix socket and says `CONNECT <port>\n`, the
//! device answers `OK <host_port>\n` once the guest accepted; guest
//! connections to the host's port `P` arrive on `<uds>_<P>` (see
//! `docs/architecture.md`). Data moved here is the probe's
//! [`Pattern`], summarized the same way the guest does.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use husk_guest_probe::digest::{copy_summarized, summarize, Summary};
use husk_guest_probe::pattern::Pattern;

use super::ConsoleWatch;

/// The longest a single read or write on a test connection may block: a
/// stalled device fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the device may take to answer `CONNECT`: it forwards the
/// request to the guest and waits for its answer (2 s by default).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `CONNECT` attempts before giving up: the device refuses a port the guest
/// is not listening on yet, and under TCG the guest can be slow to listen.
const CONNECT_ATTEMPTS: u32 = 20;

/// Connects to `port` in the guest through the device socket `uds`;
/// stops retrying once the guest ended.
pub fn connect(uds: &Path, port: u32, watch: &ConsoleWatch) -> io::Result<UnixStream> {
    let mut last_error = io::Error::other("no connect attempt");
    for _ in 0..CONNECT_ATTEMPTS {
        if watch.has_guest_ended() {
            break;
        }
        match try_connect(uds, port) {
            Ok(stream) => return Ok(stream),
            Err(error) => {
                last_error = error;
                thread::sleep(Duration::from_millis(250));
            }
        }
    }
    Err(last_error)
}

fn try_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: the stream's data follows the line at once.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the device closed CONNECT {port} without OK"),
            ));
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(io::Error::other(format!(
            "CONNECT {port} answered {line:?}"
        )));
    }
    Ok(stream)
}

/// Accepts one connection, giving up when the guest ended or after
/// `timeout`.
pub fn accept(
    listener: &UnixListener,
    watch: &ConsoleWatch,
    timeout: Duration,
) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(stream);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if watch.has_guest_ended() || Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no guest connection arrived",
                    ));
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Sends `send_bytes` of pattern `seed` while receiving to EOF; returns
/// (sent, received).
pub fn duplex(stream: UnixStream, send_bytes: u64, seed: u64) -> io::Result<(Summary, Summary)> {
    let mut sender = stream.try_clone()?;
    let sending = thread::spawn(move || -> io::Result<Summary> {
        let summary = copy_summarized(&mut Pattern::new(seed, send_bytes), &mut sender)?;
        sender.shutdown(Shutdown::Write)?;
        Ok(summary)
    });
    let received = summarize(&stream)?;
    let sent = sending
        .join()
        .map_err(|_| io::Error::other("the sender thread panicked"))??;
    Ok((sent, received))
}

/// Sends `bytes` of pattern `seed` and checks the peer echoes exactly that.
pub fn echo_round_trip(stream: UnixStream, seed: u64, bytes: u64) -> io::Result<()> {
    let (sent, received) = duplex(stream, bytes, seed)?;
    if sent == received {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sent {sent}, echo was {received}"
        )))
    }
}

/// Echoes everything to EOF, then ends the sending side; returns the bytes.
pub fn echo(mut stream: UnixStream) -> io::Result<u64> {
    let mut writer = stream.try_clone()?;
    let summary = copy_summarized(&mut stream, &mut writer)?;
    writer.shutdown(Shutdown::Write)?;
    Ok(summary.bytes)
}
