//! The debug console: a shell in the guest, outside every container, for
//! an operator (`husk-ctl exec`). It exists only after the host asked for
//! it with `StartDebugConsole`, which the shim sends only when its
//! configuration says `debug_console = true`; until then nothing listens
//! on its port and a connection to it is refused.
//!
//! Each connection gets one shell whose stdin, stdout and stderr are the
//! connection itself (no terminal: commands are read line by line, and
//! the shell ends at the stream's end). It listens on vsock port
//! [`DEBUG_CONSOLE_VSOCK_PORT`] in the guest, or on the Unix socket
//! `<state dir>/debug-console.sock` in host test mode. The product
//! initramfs has no shell: the shim appends one (the host's static
//! busybox) to the initramfs of a pod whose debug console is on.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use husk_protocols::DEBUG_CONSOLE_VSOCK_PORT;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

use crate::error::{AgentError, Result};
use crate::sandbox::AgentConfig;

/// Where the shell is looked for, first found wins.
pub const SHELLS: [&str; 2] = ["/bin/sh", "/bin/busybox"];
/// The socket in host test mode, inside the state directory.
const TEST_MODE_SOCKET: &str = "debug-console.sock";
/// Pending connections the listener holds.
const BACKLOG: i32 = 4;

/// Whether the console serves already, and where.
static SERVING: Mutex<Option<String>> = Mutex::new(None);

enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<OwnedFd> {
        match self {
            Listener::Vsock(fd) => {
                let raw =
                    socket::accept4(std::os::fd::AsRawFd::as_raw_fd(fd), SockFlag::SOCK_CLOEXEC)?;
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
            }
            Listener::Unix(listener) => listener.accept().map(|(stream, _)| stream.into()),
        }
    }
}

fn bind_vsock(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )?;
    socket::listen(&fd.as_fd(), Backlog::new(BACKLOG)?)?;
    Ok(fd)
}

/// Starts serving shells (once; a second call reports where it serves).
/// Returns the address it serves on.
pub fn start(config: &AgentConfig) -> Result<String> {
    let mut serving = SERVING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(address) = serving.as_ref() {
        return Ok(address.clone());
    }
    let shell = find_shell(Path::new("/")).ok_or_else(|| AgentError::Unsatisfiable {
        what: "the debug console".into(),
        why: format!("the guest has no shell ({})", SHELLS.join(", ")),
    })?;
    let (listener, address) = if config.test_mode {
        let path = config.state_dir.join(TEST_MODE_SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(AgentError::io("listen on", &path))?;
        (Listener::Unix(listener), path.display().to_string())
    } else {
        let port = DEBUG_CONSOLE_VSOCK_PORT;
        let fd = bind_vsock(port).map_err(|e| {
            AgentError::io("listen on vsock port", Path::new(&port.to_string()))(e.into())
        })?;
        (Listener::Vsock(fd), format!("vsock port {port}"))
    };
    std::thread::Builder::new()
        .name("debug-console".into())
        .spawn(move || serve(listener, shell))
        .map_err(AgentError::io(
            "start the thread of",
            Path::new("the debug console"),
        ))?;
    tracing::info!(%address, "debug console serving");
    *serving = Some(address.clone());
    Ok(address)
}

/// The first of [`SHELLS`] that exists below `root`.
fn find_shell(root: &Path) -> Option<PathBuf> {
    SHELLS
        .iter()
        .map(|shell| root.join(shell.trim_start_matches('/')))
        .find(|path| path.is_file())
}

fn serve(listener: Listener, shell: PathBuf) {
    loop {
        match listener.accept() {
            Ok(connection) => {
                if let Err(error) = spawn_shell(&shell, connection) {
                    tracing::warn!(%error, shell = %shell.display(), "cannot start a debug shell");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "debug console accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// One shell on `connection`. The agent (PID 1) reaps it when it ends.
fn spawn_shell(shell: &Path, connection: OwnedFd) -> std::io::Result<()> {
    let mut command = Command::new(shell);
    if shell.ends_with("busybox") {
        command.arg("sh");
    }
    command
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/")
        .current_dir("/")
        .stdin(Stdio::from(connection.try_clone()?))
        .stdout(Stdio::from(connection.try_clone()?))
        .stderr(Stdio::from(connection));
    let child = command.spawn()?;
    tracing::info!(pid = child.id(), "debug shell started");
    // Not waited for here: the reaper collects it.
    drop(child);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_is_found_below_the_root_and_sh_comes_first() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(find_shell(root.path()), None);
        std::fs::create_dir(root.path().join("bin")).unwrap();
        std::fs::write(root.path().join("bin/busybox"), b"").unwrap();
        assert_eq!(
            find_shell(root.path()),
            Some(root.path().join("bin/busybox"))
        );
        std::fs::write(root.path().join("bin/sh"), b"").unwrap();
        assert_eq!(find_shell(root.path()), Some(root.path().join("bin/sh")));
    }
}
