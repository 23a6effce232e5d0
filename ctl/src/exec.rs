//! `husk-ctl exec`: the guest's debug shell. Only a pod started with
//! `debug_console = true` has one (its `/info` says so); otherwise exec
//! says that and fails. The shell is reached like the agent: a connection
//! to the pod's hybrid vsock socket, `CONNECT 1027`, `OK <port>`, then the
//! stream is the shell's stdin, stdout and stderr. With a command, the
//! command (each word quoted) is sent as one line and the stream's write
//! side closed, so the shell runs it and ends; without one, this
//! program's stdin is relayed until its end.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};
use husk_protocols::DEBUG_CONSOLE_VSOCK_PORT;

use crate::sandboxes::{self, Found};

/// The longest handshake answer read (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 32;

/// A word quoted for the shell.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// Opens the shell of `found` and runs `command` in it (or relays stdin).
pub fn run(found: &Found, command: &[String]) -> Result<()> {
    let info = sandboxes::info(found)?;
    if !info.debug_console {
        bail!(
            "the debug console of sandbox {} is off: set debug_console = true in the husk configuration (default off) and start the pod again",
            found.id
        );
    }
    let uds = found.paths.vsock_uds();
    let mut stream = UnixStream::connect(&uds)
        .with_context(|| format!("cannot connect to {}", uds.display()))?;
    stream.set_read_timeout(Some(sandboxes::CLIENT_TIMEOUT))?;
    stream.write_all(format!("CONNECT {DEBUG_CONSOLE_VSOCK_PORT}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_HANDSHAKE_LINE {
        if stream.read(&mut byte)? == 0 {
            bail!("the guest refused vsock port {DEBUG_CONSOLE_VSOCK_PORT}: no debug shell serves (connection closed)");
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        bail!(
            "unexpected answer to CONNECT {DEBUG_CONSOLE_VSOCK_PORT}: {:?}",
            String::from_utf8_lossy(&line)
        );
    }
    stream.set_read_timeout(None)?;
    if command.is_empty() {
        let mut to_guest = stream.try_clone()?;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_guest);
            let _ = to_guest.shutdown(Shutdown::Write);
        });
    } else {
        let words: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
        stream.write_all(format!("{}\n", words.join(" ")).as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
    }
    let mut stdout = std::io::stdout().lock();
    let mut buffer = [0u8; 8192];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buffer[..n])?;
        stdout.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("uname"), "'uname'");
        assert_eq!(shell_quote("it's; rm"), "'it'\\''s; rm'");
    }
}
