//! Reaching the agent: the endpoint forms and the hybrid vsock handshake.
//!
//! Under a VM, the host side of vsock is one Unix socket per VM (Firecracker
//! style "hybrid vsock"): a client connects to it and writes
//! `CONNECT <port>\n`; once the guest accepts, the device answers
//! `OK <host_port>\n` and the socket becomes the stream. In host test mode
//! the agent listens on two plain Unix sockets instead.

use std::path::{Path, PathBuf};

use husk_protocols::{AGENT_API_VSOCK_PORT, AGENT_STDIO_VSOCK_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::ClientError;

/// Longest handshake answer we read (`OK ` and a 32-bit port, with margin).
const MAX_HANDSHAKE_REPLY_BYTES: usize = 64;
/// How long the device may take to answer `CONNECT`: husk's device resets
/// an unanswered guest connect after 2 s, so a silent device is broken and
/// must not hang the caller past its own deadline.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the agent listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The VM's hybrid vsock Unix socket; API and stdio use their vsock
    /// ports through it.
    HybridVsock { uds: PathBuf },
    /// The agent in host test mode: one Unix socket for the API, one for
    /// stdio streams.
    Unix {
        api_socket: PathBuf,
        stdio_socket: PathBuf,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::HybridVsock { uds } => write!(f, "hybrid vsock {}", uds.display()),
            Endpoint::Unix { api_socket, .. } => write!(f, "unix {}", api_socket.display()),
        }
    }
}

impl Endpoint {
    /// A new connection to the API.
    pub(crate) async fn connect_api(&self) -> Result<UnixStream, ClientError> {
        match self {
            Endpoint::HybridVsock { uds } => hybrid_vsock_connect(uds, AGENT_API_VSOCK_PORT).await,
            Endpoint::Unix { api_socket, .. } => connect_unix(api_socket).await,
        }
    }

    /// A new connection to the stdio port.
    pub(crate) async fn connect_stdio(&self) -> Result<UnixStream, ClientError> {
        match self {
            Endpoint::HybridVsock { uds } => {
                hybrid_vsock_connect(uds, AGENT_STDIO_VSOCK_PORT).await
            }
            Endpoint::Unix { stdio_socket, .. } => connect_unix(stdio_socket).await,
        }
    }
}

async fn connect_unix(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })
}

/// Connects to guest vsock `port` through the VM's hybrid vsock socket
/// `uds` and returns the stream once the guest accepted.
pub async fn hybrid_vsock_connect(uds: &Path, port: u32) -> Result<UnixStream, ClientError> {
    hybrid_vsock_connect_within(uds, port, HANDSHAKE_TIMEOUT).await
}

async fn hybrid_vsock_connect_within(
    uds: &Path,
    port: u32,
    timeout: std::time::Duration,
) -> Result<UnixStream, ClientError> {
    match tokio::time::timeout(timeout, hybrid_vsock_handshake(uds, port)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Handshake {
            path: uds.to_owned(),
            port,
            reply: format!("no answer within {} ms", timeout.as_millis()),
        }),
    }
}

async fn hybrid_vsock_handshake(uds: &Path, port: u32) -> Result<UnixStream, ClientError> {
    let mut stream = connect_unix(uds).await?;
    let io_error = |source| ClientError::Connect {
        path: uds.to_owned(),
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_error)?;
    // Byte by byte: whatever follows the newline is the guest's data. Only
    // a whole line counts: an answer cut short by the end of the stream,
    // or longer than MAX_HANDSHAKE_REPLY_BYTES, is refused (accepting the
    // first 64 bytes of a longer line would hand its tail to the caller
    // as if the guest had sent it).
    let mut reply = Vec::new();
    let mut whole_line = false;
    while reply.len() <= MAX_HANDSHAKE_REPLY_BYTES {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(io_error)?;
        if n == 0 {
            break;
        }
        if byte[0] == b'\n' {
            whole_line = true;
            break;
        }
        reply.push(byte[0]);
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let accepted = whole_line
        && reply
            .strip_prefix("OK ")
            .is_some_and(|host_port| host_port.trim().parse::<u32>().is_ok());
    if accepted {
        Ok(stream)
    } else {
        Err(ClientError::Handshake {
            path: uds.to_owned(),
            port,
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A fake hybrid vsock device that answers the handshake with `answer`
    /// and then echoes one line.
    async fn fake_device(listener: UnixListener, answer: &'static str) -> String {
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = tokio::io::BufReader::new(stream);
        let mut request = String::new();
        reader.read_line(&mut request).await.unwrap();
        reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        reader.get_mut().write_all(line.as_bytes()).await.unwrap();
        request
    }

    #[tokio::test]
    async fn hybrid_vsock_handshake_names_the_port_and_then_carries_data() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let device = tokio::spawn(fake_device(listener, "OK 1073741824\n"));
        let mut stream = hybrid_vsock_connect(&uds, 1024).await.unwrap();
        stream.write_all(b"ping\n").await.unwrap();
        let mut echoed = [0u8; 5];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping\n");
        assert_eq!(device.await.unwrap(), "CONNECT 1024\n");
    }

    #[tokio::test]
    async fn a_device_that_never_answers_connect_fails_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            drop(stream);
        });
        let error = hybrid_vsock_connect_within(&uds, 1024, std::time::Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("no answer within 200 ms"),
            "{error}"
        );
        silent.abort();
    }

    /// A device that answers `answer` to the first CONNECT, then closes.
    async fn answer_once(listener: UnixListener, answer: Vec<u8>) {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(&answer).await;
    }

    #[tokio::test]
    async fn a_handshake_answer_without_its_newline_is_refused() {
        // Caught by the hybrid_vsock_connect fuzz target's oracle (seed-ok-unterminated).
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        tokio::spawn(answer_once(listener, b"OK 12".to_vec()));
        let error = hybrid_vsock_connect(&uds, 1024).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::Handshake { reply, .. } if reply == "OK 12"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_overlong_handshake_answer_is_refused_not_cut_into_data() {
        // Caught by the hybrid_vsock_connect fuzz target's oracle (seed-ok-long): the
        // first 64 bytes read as `OK 1`, the rest of the line must not
        // become the guest's data.
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let mut line = b"OK 1".to_vec();
        line.extend_from_slice(&[b' '; 70]);
        line.push(b'\n');
        tokio::spawn(answer_once(listener, line));
        let error = hybrid_vsock_connect(&uds, 1024).await.unwrap_err();
        assert!(matches!(&error, ClientError::Handshake { .. }), "{error}");
    }

    #[tokio::test]
    async fn hybrid_vsock_refusal_is_reported_with_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"FAILED no listener\n").await;
        });
        let error = hybrid_vsock_connect(&uds, 1025).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::Handshake { port: 1025, reply, .. } if reply == "FAILED no listener"),
            "{error}"
        );
    }
}
