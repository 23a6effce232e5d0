//! `husk-guest-probe`: what guest-tier test scripts need and busybox lacks.
//! It runs inside the guest (static, from the test initramfs); progress
//! lines go to stderr with a `HUSK_PROBE` prefix (the host watches the
//! console for them), results go to stdout as `key=value` pairs.
//!
//! ```text
//! pattern BYTES SEED                      the deterministic test data, to stdout
//! vsock-listen PORT SEND_BYTES SEED       accept one connection; send and receive at once
//! vsock-connect CID PORT SEND_BYTES SEED  connect; send and receive at once
//! vsock-many CID PORT N BYTES             N connections open at once, each echoed back
//! vsock-echo-many PORT N                  accept N connections, echo each
//! setxattr PATH NAME VALUE (hex:.. for bytes) | getxattr PATH NAME | listxattr PATH | removexattr PATH NAME
//! ```

use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;

use husk_guest_probe::digest::{copy_summarized, summarize, Summary};
use husk_guest_probe::pattern::Pattern;
use husk_guest_probe::vsock::{VsockListener, VsockStream};

const USAGE: &str =
    "usage: husk-guest-probe pattern BYTES SEED | vsock-listen PORT SEND_BYTES SEED | \
vsock-connect CID PORT SEND_BYTES SEED | vsock-many CID PORT N BYTES | vsock-echo-many PORT N | \
setxattr PATH NAME VALUE | getxattr PATH NAME | listxattr PATH | removexattr PATH NAME";

/// Connections a listener queues: enough for `vsock-echo-many` with 100+.
const LISTEN_BACKLOG: i32 = 256;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["pattern", bytes, seed] => pattern(number(bytes), number(seed)),
        ["vsock-listen", port, send, seed] => {
            vsock_listen(number(port) as u32, number(send), number(seed))
        }
        ["vsock-connect", cid, port, send, seed] => vsock_connect(
            number(cid) as u32,
            number(port) as u32,
            number(send),
            number(seed),
        ),
        ["vsock-many", cid, port, n, bytes] => vsock_many(
            number(cid) as u32,
            number(port) as u32,
            number(n) as usize,
            number(bytes),
        ),
        ["vsock-echo-many", port, n] => vsock_echo_many(number(port) as u32, number(n) as usize),
        ["setxattr", path, name, value] => set_xattr(path, name, value),
        ["getxattr", path, name] => get_xattr(path, name),
        ["listxattr", path] => list_xattr(path),
        ["removexattr", path, name] => remove_xattr(path, name),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("husk-guest-probe {}: {error}", args.join(" "));
            ExitCode::FAILURE
        }
    }
}

/// Parses a decimal argument; exits with the usage on anything else.
fn number(text: &str) -> u64 {
    text.parse().unwrap_or_else(|_| {
        eprintln!("husk-guest-probe: {text:?} is not a number\n{USAGE}");
        std::process::exit(2)
    })
}

fn progress(line: &str) {
    // stderr is unbuffered: the line reaches the console before we block.
    eprintln!("HUSK_PROBE {line}");
}

fn pattern(bytes: u64, seed: u64) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
    io::copy(&mut Pattern::new(seed, bytes), &mut out)?;
    out.flush()
}

/// Sends `send_bytes` of pattern `seed` from a thread while receiving to
/// EOF; prints both summaries.
fn duplex(stream: VsockStream, send_bytes: u64, seed: u64) -> io::Result<()> {
    let mut sender = stream.try_clone()?;
    let sending = thread::spawn(move || -> io::Result<Summary> {
        let summary = copy_summarized(&mut Pattern::new(seed, send_bytes), &mut sender)?;
        sender.shutdown_write()?;
        Ok(summary)
    });
    let received = summarize(stream)?;
    let sent = sending
        .join()
        .map_err(|_| io::Error::other("the sender thread panicked"))??;
    println!(
        "sent_bytes={} sent_sha256={} received_bytes={} received_sha256={}",
        sent.bytes, sent.sha256, received.bytes, received.sha256
    );
    Ok(())
}

fn vsock_listen(port: u32, send_bytes: u64, seed: u64) -> io::Result<()> {
    let listener = VsockListener::bind(port, LISTEN_BACKLOG)?;
    progress(&format!("listening port={port}"));
    let stream = listener.accept()?;
    duplex(stream, send_bytes, seed)
}

fn vsock_connect(cid: u32, port: u32, send_bytes: u64, seed: u64) -> io::Result<()> {
    duplex(VsockStream::connect(cid, port)?, send_bytes, seed)
}

/// Opens `n` connections, waits until all are open, then has each send
/// `bytes` of its own pattern (seed = its index) and check the echo.
fn vsock_many(cid: u32, port: u32, n: usize, bytes: u64) -> io::Result<()> {
    let all_open = Arc::new(Barrier::new(n));
    let workers: Vec<_> = (0..n)
        .map(|index| {
            let all_open = Arc::clone(&all_open);
            thread::spawn(move || -> io::Result<()> {
                let connected = VsockStream::connect(cid, port);
                if all_open.wait().is_leader() {
                    progress(&format!("vsock-many: {n} connection attempts returned"));
                }
                let stream = connected?;
                echo_round_trip(stream, index as u64, bytes)
            })
        })
        .collect();
    let mut echoed = 0;
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(())) => echoed += 1,
            Ok(Err(error)) => eprintln!("husk-guest-probe: connection {index}: {error}"),
            Err(_) => eprintln!("husk-guest-probe: connection {index}: thread panicked"),
        }
    }
    println!("connections={n} echoed={echoed}");
    if echoed == n {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} of {n} connections failed",
            n - echoed
        )))
    }
}

/// Sends `bytes` of pattern `seed` and checks that the peer echoes exactly it.
fn echo_round_trip(stream: VsockStream, seed: u64, bytes: u64) -> io::Result<()> {
    let mut sender = stream.try_clone()?;
    let sending = thread::spawn(move || -> io::Result<Summary> {
        let summary = copy_summarized(&mut Pattern::new(seed, bytes), &mut sender)?;
        sender.shutdown_write()?;
        Ok(summary)
    });
    let received = summarize(stream)?;
    let sent = sending
        .join()
        .map_err(|_| io::Error::other("the sender thread panicked"))??;
    if received == sent {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sent {sent}, echo was {received}"
        )))
    }
}

/// Accepts `n` connections, each echoed from its own thread until EOF.
fn vsock_echo_many(port: u32, n: usize) -> io::Result<()> {
    let listener = VsockListener::bind(port, LISTEN_BACKLOG)?;
    progress(&format!("listening port={port}"));
    let mut workers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = listener.accept()?;
        workers.push(thread::spawn(move || -> io::Result<u64> {
            let mut writer = stream.try_clone()?;
            let summary = copy_summarized(&mut stream, &mut writer)?;
            writer.shutdown_write()?;
            Ok(summary.bytes)
        }));
    }
    let mut served = 0;
    let mut echoed_bytes = 0;
    for worker in workers {
        if let Ok(Ok(bytes)) = worker.join() {
            served += 1;
            echoed_bytes += bytes;
        }
    }
    println!("served={served} echoed_bytes={echoed_bytes}");
    if served == n {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} of {n} connections failed",
            n - served
        )))
    }
}

fn c_string(text: &str) -> io::Result<CString> {
    CString::new(std::path::Path::new(text).as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{text:?} contains a NUL byte")))
}

fn check(result: libc::ssize_t) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

/// An xattr value from the command line: `hex:0a1b...` for binary values
/// (a `security.capability` structure), the text itself otherwise.
fn xattr_value(value: &str) -> io::Result<Vec<u8>> {
    let Some(hex) = value.strip_prefix("hex:") else {
        return Ok(value.as_bytes().to_vec());
    };
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad hex value {value:?}"),
        )
    };
    if hex.len() % 2 != 0 {
        return Err(invalid());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| invalid()))
        .collect()
}

fn set_xattr(path: &str, name: &str, value: &str) -> io::Result<()> {
    let (path, name) = (c_string(path)?, c_string(name)?);
    let value = xattr_value(value)?;
    // SAFETY: path and name are NUL-terminated; value is valid for its length.
    let result = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(result as libc::ssize_t).map(|_| ())
}

fn get_xattr(path: &str, name: &str) -> io::Result<()> {
    let (path, name) = (c_string(path)?, c_string(name)?);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: path and name are NUL-terminated; buf is valid for its length.
    let len = check(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    io::stdout().write_all(&buf[..len])?;
    println!();
    Ok(())
}

fn list_xattr(path: &str) -> io::Result<()> {
    let path = c_string(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: path is NUL-terminated; buf is valid for its length.
    let len = check(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    for name in buf[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        println!("{}", String::from_utf8_lossy(name));
    }
    Ok(())
}

fn remove_xattr(path: &str, name: &str) -> io::Result<()> {
    let (path, name) = (c_string(path)?, c_string(name)?);
    // SAFETY: path and name are NUL-terminated.
    let result = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    check(result as libc::ssize_t).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattrs_round_trip_on_a_host_file() {
        let path = std::env::temp_dir().join(format!("husk-probe-xattr-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let path_text = path.to_str().unwrap();
        // tmpfs without user xattrs would refuse; /tmp here is ext4 or tmpfs
        // with CONFIG_TMPFS_XATTR, both take user.* names.
        set_xattr(path_text, "user.husk", "value").unwrap();
        let cpath = c_string(path_text).unwrap();
        let name = c_string("user.husk").unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: as in get_xattr.
        let len = unsafe {
            libc::getxattr(
                cpath.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(&buf[..len as usize], b"value");
        remove_xattr(path_text, "user.husk").unwrap();
        assert!(get_xattr(path_text, "user.husk").is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
