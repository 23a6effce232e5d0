//! CRI port-forward for a VM pod. containerd serves `PortForward` by
//! dialling `localhost:<port>` inside the pod's network namespace on the
//! host (what reaches a runc pod's listener). Nothing of a VM pod listens
//! there, so the shim does: [`PortForwardListener::open`] makes one TCP
//! listener on 127.0.0.1 in that namespace and steers every TCP connection
//! to 127.0.0.1, whatever its port, to it (`sk_lookup`). Each accepted
//! connection still carries the port containerd asked for as its local
//! address; [`PortForwarding`] opens a stream to the agent's port-forward
//! vsock port, names that port, and once the agent has dialled
//! `127.0.0.1:<port>` in the pod's namespace in the guest, copies bytes
//! both ways. A refused dial resets the connection, so containerd reports
//! an error, as it does when nothing listens in a runc pod.
//!
//! Limits: `limits.max_port_forward_connections` connections at once per
//! pod; more are reset. The agent's answer is read up to
//! `MAX_REPLY_BYTES` and logged only at debug level (the guest writes it).

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener as StdTcpListener};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent_client::hybrid_vsock_connect;
use husk_protocols::port_forward::{parse_reply, request, MAX_REPLY_BYTES};
use husk_protocols::AGENT_PORT_FORWARD_VSOCK_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::netns;
use super::sk_lookup::Steering;

/// How long the agent may take to answer a forwarded connection's request
/// (its dial is bounded at 10 s in the guest).
const AGENT_REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// The listener in the pod's network namespace and its steering.
pub struct PortForwardListener {
    listener: StdTcpListener,
    steering: Steering,
}

impl PortForwardListener {
    /// Makes the listener in the network namespace `netns` and steers
    /// connections to 127.0.0.1 there to it. Needs `bpf(2)`: call it
    /// before the shim's process-wide deny list is loaded.
    pub fn open(netns: &File) -> Result<Self> {
        let netns_fd = netns
            .try_clone()
            .context("cannot duplicate the pod's network namespace fd")?;
        netns::run_in(netns, "open the port-forward listener", move || {
            let listener = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("cannot listen on 127.0.0.1 in the pod's network namespace")?;
            let steering = Steering::attach(netns_fd.as_fd(), listener.as_fd())
                .context("cannot steer the namespace's connections to 127.0.0.1 to it")?;
            Ok(Self { listener, steering })
        })
    }

    /// Starts forwarding accepted connections to the agent behind the
    /// VM's hybrid vsock socket `vsock_uds`, at most `max_connections` at
    /// once. Must run inside the shim's tokio runtime.
    pub fn serve(self, vsock_uds: PathBuf, max_connections: usize) -> Result<PortForwarding> {
        self.listener
            .set_nonblocking(true)
            .context("cannot make the port-forward listener non-blocking")?;
        let listener = TcpListener::from_std(self.listener)
            .context("cannot register the port-forward listener")?;
        let accepting = tokio::spawn(accept_loop(
            listener,
            Arc::new(vsock_uds),
            Arc::new(Semaphore::new(max_connections)),
        ));
        Ok(PortForwarding {
            accepting,
            _steering: self.steering,
        })
    }
}

/// Forwarding in progress. Dropping it stops accepting, ends every
/// forwarded connection and detaches the steering.
pub struct PortForwarding {
    accepting: tokio::task::JoinHandle<()>,
    _steering: Steering,
}

impl Drop for PortForwarding {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection's task and so closes both of its sockets.
        self.accepting.abort();
    }
}

async fn accept_loop(listener: TcpListener, vsock_uds: Arc<PathBuf>, slots: Arc<Semaphore>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((connection, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!("port-forward connection over limits.max_port_forward_connections, reset");
                        reset(connection);
                        continue;
                    };
                    let vsock_uds = vsock_uds.clone();
                    connections.spawn(async move {
                        forward(connection, &vsock_uds).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "port-forward accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Ends `connection` with a reset, so the dialler sees an error rather
/// than an orderly end.
fn reset(connection: TcpStream) {
    // A zero linger makes close send RST at once (it never blocks).
    let abort = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&connection, nix::sys::socket::sockopt::Linger, &abort);
    drop(connection);
}

async fn forward(mut connection: TcpStream, vsock_uds: &std::path::Path) {
    let port = match connection.local_addr() {
        Ok(address) => address.port(),
        Err(error) => {
            tracing::debug!(%error, "a port-forward connection without a local address");
            return reset(connection);
        }
    };
    let mut guest = match open_to_guest(vsock_uds, port).await {
        Ok(guest) => guest,
        Err(error) => {
            tracing::debug!(port, error = %format!("{error:#}"), "port-forward into the pod failed");
            return reset(connection);
        }
    };
    match tokio::io::copy_bidirectional(&mut connection, &mut guest).await {
        Ok((to_pod, from_pod)) => {
            tracing::debug!(port, to_pod, from_pod, "port-forward connection ended")
        }
        Err(error) => tracing::debug!(port, %error, "port-forward connection failed"),
    }
}

/// A stream to `127.0.0.1:port` in the pod, through the agent.
async fn open_to_guest(vsock_uds: &std::path::Path, port: u16) -> Result<UnixStream> {
    let mut guest = hybrid_vsock_connect(vsock_uds, AGENT_PORT_FORWARD_VSOCK_PORT)
        .await
        .context("cannot reach the agent's port-forward port")?;
    guest
        .write_all(request(port).as_bytes())
        .await
        .context("cannot send the port-forward request")?;
    let reply = tokio::time::timeout(AGENT_REPLY_TIMEOUT, read_reply_line(&mut guest))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the agent did not answer within {AGENT_REPLY_TIMEOUT:?}")
        })??;
    parse_reply(&reply).map_err(|why| anyhow::anyhow!("the agent could not dial: {why}"))?;
    Ok(guest)
}

/// Reads one line byte by byte (no connection data is consumed), at most
/// `MAX_REPLY_BYTES` with its newline.
async fn read_reply_line(stream: &mut UnixStream) -> Result<String> {
    let mut line = Vec::new();
    loop {
        let byte = stream
            .read_u8()
            .await
            .context("the agent closed the stream before answering")?;
        if byte == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        anyhow::ensure!(
            line.len() + 1 < MAX_REPLY_BYTES,
            "the agent's answer is longer than {MAX_REPLY_BYTES} bytes"
        );
        line.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent behind a hybrid vsock socket: answers CONNECT, reads
    /// the request and answers `reply`, then echoes in upper case.
    async fn fake_agent(dir: &std::path::Path, reply: &'static str) -> PathBuf {
        let uds = dir.join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut connect = [0u8; 13];
                    stream.read_exact(&mut connect).await.unwrap();
                    assert_eq!(&connect, b"CONNECT 1026\n");
                    stream.write_all(b"OK 5000\n").await.unwrap();
                    let line = read_reply_line_of(&mut stream).await;
                    stream.write_all(reply.as_bytes()).await.unwrap();
                    let mut data = vec![0u8; 64];
                    let n = stream.read(&mut data).await.unwrap();
                    let answer = format!("{line}:{}", String::from_utf8_lossy(&data[..n]));
                    stream
                        .write_all(answer.to_uppercase().as_bytes())
                        .await
                        .unwrap();
                });
            }
        });
        uds
    }

    async fn read_reply_line_of(stream: &mut UnixStream) -> String {
        read_reply_line(stream).await.unwrap()
    }

    #[tokio::test]
    async fn a_forwarded_stream_names_its_port_and_carries_bytes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_agent(dir.path(), "OK\n").await;
        let mut guest = open_to_guest(&uds, 8080).await.unwrap();
        guest.write_all(b"ping").await.unwrap();
        let mut answer = String::new();
        guest.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "8080:PING");
    }

    #[tokio::test]
    async fn a_refused_dial_is_an_error_naming_the_agents_reason() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_agent(dir.path(), "ERR connection refused\n").await;
        let error = open_to_guest(&uds, 8081).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("could not dial: connection refused"),
            "{error:#}"
        );
    }

    #[tokio::test]
    async fn an_endless_answer_is_refused() {
        let (mut agent, mut shim) = UnixStream::pair().unwrap();
        agent.write_all(&[b'x'; 1024]).await.unwrap();
        let error = read_reply_line(&mut shim).await.unwrap_err();
        assert!(error.to_string().contains("longer than"), "{error}");
    }
}
