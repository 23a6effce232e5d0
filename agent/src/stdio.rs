//! Process stdio over streams: the host opens one stream per stdio pipe to
//! the stdio port (vsock 1025 in the guest, a Unix socket in test mode) and
//! announces its id in a one-line preamble; requests then name the ids.
//!
//! [`StreamRegistry`] holds announced streams until a request claims them.
//! The copy tasks move bytes as fast as both sides allow, without polling:
//! each side is an async fd (pipes, the pty master) or socket. End of file
//! travels both ways: the host shutting down its write side closes the
//! process's stdin, and the process closing its stdout shuts down the
//! stream's write side once everything before it has been written.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use husk_protocols::stdio::{is_valid_stream_id, MAX_STREAM_ID_LEN};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use crate::error::{AgentError, Result};

/// How long a request waits for a stream it names to be announced (the
/// host may open streams and send the request concurrently).
const STREAM_CLAIM_WAIT: Duration = Duration::from_secs(10);
/// Announced streams kept unclaimed at most, so a host cannot exhaust the
/// guest's descriptors.
const MAX_PENDING_STREAMS: usize = 1024;
/// How long the preamble may take to arrive on a new stream.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer size: a pipe's default capacity.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// A bidirectional byte stream from the host.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A host stream.
pub type HostStream = Box<dyn Duplex>;

/// Streams announced and not yet claimed by a request.
#[derive(Clone, Default)]
pub struct StreamRegistry {
    pending: Arc<Mutex<HashMap<String, HostStream>>>,
    arrived: Arc<Notify>,
}

impl StreamRegistry {
    /// Reads the preamble of a new stream and keeps it under its id.
    pub async fn announce(&self, mut stream: HostStream) {
        let id = match tokio::time::timeout(PREAMBLE_TIMEOUT, read_preamble(&mut stream)).await {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::warn!("stdio stream without a valid preamble, closed");
                return;
            }
            Err(_) => {
                tracing::warn!("stdio stream sent no preamble in time, closed");
                return;
            }
        };
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING_STREAMS {
            tracing::warn!(stream = %id, "too many unclaimed stdio streams, closed");
            return;
        }
        if pending.contains_key(&id) {
            tracing::warn!(stream = %id, "stdio stream id announced twice, second closed");
            return;
        }
        tracing::debug!(stream = %id, "stdio stream announced");
        pending.insert(id, stream);
        drop(pending);
        self.arrived.notify_waiters();
    }

    /// Takes stream `id`, waiting for it to be announced.
    pub async fn claim(&self, id: &str) -> Result<HostStream> {
        let deadline = tokio::time::Instant::now() + STREAM_CLAIM_WAIT;
        loop {
            let arrived = self.arrived.notified();
            if let Some(stream) = self.lock().remove(id) {
                return Ok(stream);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(AgentError::StreamMissing {
                    id: id.to_owned(),
                    waited_ms: STREAM_CLAIM_WAIT.as_millis() as u64,
                });
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostStream>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads `<id>\n` byte by byte (so no process data is consumed).
async fn read_preamble(stream: &mut HostStream) -> Option<String> {
    let mut id = Vec::new();
    loop {
        let byte = stream.read_u8().await.ok()?;
        if byte == b'\n' {
            break;
        }
        if id.len() >= MAX_STREAM_ID_LEN {
            return None;
        }
        id.push(byte);
    }
    let id = String::from_utf8(id).ok()?;
    is_valid_stream_id(&id).then_some(id)
}

/// A non-blocking pipe end or pty master driven by the tokio reactor. A pty
/// master reads EIO once the last slave is closed: that is its end of file.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the AsyncFd owns `fd` and deregisters it before closing
        // it; no other registration of this descriptor exists.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(guard) => guard?,
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = match self.fd.poll_write_ready(cx) {
                Poll::Ready(guard) => guard?,
                Poll::Pending => return Poll::Pending,
            };
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to`'s write side
/// down so the reader sees end of file. Returns the bytes copied.
pub async fn pump<R, W>(mut from: R, mut to: W, what: &str) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                tracing::debug!(what, %error, "stdio read ended");
                break;
            }
        };
        if let Err(error) = to.write_all(&buffer[..n]).await {
            tracing::debug!(what, %error, "stdio write ended");
            break;
        }
        total += n as u64;
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
    total
}

/// A pipe whose read end is non-blocking for the agent.
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| AgentError::Io {
        op: "create",
        path: "pipe".into(),
        source: e.into(),
    })
}
