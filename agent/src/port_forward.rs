//! CRI `PortForward` in the guest: the host opens one stream per forwarded
//! TCP connection to the port-forward vsock port and names the TCP port
//! in a one-line request (`husk_protocols::port_forward`). The agent dials
//! `127.0.0.1:<port>` inside the pod's network namespace (the sandbox
//! container's, where every container of the pod listens), as containerd
//! does in a runc pod's namespace on the host, answers `OK` or `ERR <why>`
//! and then copies bytes both ways until both sides have ended.
//!
//! The dial runs on a short-lived thread of its own that joins the pod's
//! namespace: a socket belongs to the namespace it was made in, and no
//! thread of the agent's runtime ever changes namespace.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use husk_protocols::port_forward::{parse_request, reply_error, MAX_REQUEST_BYTES, REPLY_OK};
use nix::sched::{setns, CloneFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sandbox::Sandbox;
use crate::stdio::HostStream;

/// How long the host may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dial in the pod may take (a loopback connect answers at
/// once; this bounds a full backlog).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwarded connections served at once; more are answered `ERR`.
pub const MAX_FORWARDED_CONNECTIONS: usize = 1024;

/// Serves forwarded connections as they are accepted.
#[derive(Clone)]
pub struct PortForwarder {
    sandbox: Arc<Sandbox>,
    active: Arc<AtomicUsize>,
}

impl PortForwarder {
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        Self {
            sandbox,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Serves one accepted stream on a task of its own.
    pub fn spawn(&self, stream: HostStream) {
        let forwarder = self.clone();
        tokio::spawn(async move { forwarder.serve(stream).await });
    }

    async fn serve(&self, mut stream: HostStream) {
        let Some(port) = read_request(&mut stream).await else {
            tracing::debug!("port-forward stream without a valid request, closed");
            return;
        };
        let slot = ActiveSlot::take(&self.active);
        let dialled = match slot {
            None => Err(format!(
                "{MAX_FORWARDED_CONNECTIONS} forwarded connections are open already"
            )),
            Some(_) => match self.sandbox.pod_network_pid() {
                Ok(pid) => dial_in_pod(pid, port).await,
                Err(error) => Err(error.to_string()),
            },
        };
        let mut target = match dialled {
            Ok(target) => target,
            Err(why) => {
                tracing::debug!(port, %why, "port-forward dial failed");
                let _ = stream.write_all(reply_error(&why).as_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            }
        };
        if stream.write_all(REPLY_OK.as_bytes()).await.is_err() {
            return;
        }
        match tokio::io::copy_bidirectional(&mut stream, &mut target).await {
            Ok((to_pod, from_pod)) => {
                tracing::debug!(port, to_pod, from_pod, "port-forward connection ended")
            }
            Err(error) => tracing::debug!(port, %error, "port-forward connection failed"),
        }
    }
}

/// One of [`MAX_FORWARDED_CONNECTIONS`], given back when dropped.
struct ActiveSlot<'a>(&'a AtomicUsize);

impl<'a> ActiveSlot<'a> {
    fn take(active: &'a AtomicUsize) -> Option<Self> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_FORWARDED_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(active))
    }
}

impl Drop for ActiveSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads the request line byte by byte (nothing of the connection's data
/// is consumed) and returns its port.
async fn read_request(stream: &mut HostStream) -> Option<u16> {
    let read = async {
        let mut line = Vec::with_capacity(MAX_REQUEST_BYTES);
        loop {
            let byte = stream.read_u8().await.ok()?;
            if byte == b'\n' {
                return parse_request(&line);
            }
            if line.len() + 1 >= MAX_REQUEST_BYTES {
                return None;
            }
            line.push(byte);
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read).await.ok()?
}

/// Connects to `127.0.0.1:port` in the network namespace of process `pid`.
async fn dial_in_pod(pid: i32, port: u16) -> Result<TcpStream, String> {
    let dial = move || -> Result<StdTcpStream, String> {
        let path = format!("/proc/{pid}/ns/net");
        let netns = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        std::thread::Builder::new()
            .name("port-forward".into())
            .spawn(move || -> Result<StdTcpStream, String> {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("cannot join the pod's network namespace: {e}"))?;
                let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                StdTcpStream::connect_timeout(&address, DIAL_TIMEOUT)
                    .map_err(|e| format!("cannot connect to {address} in the pod: {e}"))
            })
            .map_err(|e| format!("cannot start the dialling thread: {e}"))?
            .join()
            .map_err(|_| "the dialling thread panicked".to_owned())?
    };
    let stream = tokio::task::spawn_blocking(dial)
        .await
        .map_err(|e| format!("the dial task failed: {e}"))??;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make the connection non-blocking: {e}"))?;
    TcpStream::from_std(stream).map_err(|e| format!("cannot register the connection: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn request_of(bytes: &'static [u8]) -> Option<u16> {
        let (mut host, guest) = tokio::io::duplex(64);
        host.write_all(bytes).await.unwrap();
        // The host's end closes: a request cut short ends the read at once.
        drop(host);
        let mut guest: HostStream = Box::new(guest);
        read_request(&mut guest).await
    }

    #[tokio::test]
    async fn a_request_names_one_port_and_nothing_after_it_is_read() {
        let (mut host, guest) = tokio::io::duplex(64);
        host.write_all(b"8080\nDATA").await.unwrap();
        let mut guest: HostStream = Box::new(guest);
        assert_eq!(read_request(&mut guest).await, Some(8080));
        let mut rest = [0u8; 4];
        guest.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"DATA");
    }

    #[tokio::test]
    async fn bad_requests_are_refused() {
        assert_eq!(request_of(b"0\n").await, None);
        assert_eq!(request_of(b"123456\n").await, None);
        assert_eq!(request_of(b"http\n").await, None);
        assert_eq!(request_of(b"80").await, None, "no newline before the end");
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let active = AtomicUsize::new(MAX_FORWARDED_CONNECTIONS - 1);
        let last = ActiveSlot::take(&active).expect("one slot left");
        assert!(ActiveSlot::take(&active).is_none());
        drop(last);
        assert!(ActiveSlot::take(&active).is_some());
    }

    #[tokio::test]
    async fn a_dial_reaches_a_listener_in_the_namespace_of_the_pid() {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let own = std::process::id() as i32;
        match dial_in_pod(own, port).await {
            Ok(_) => {
                let (_, peer) = listener.accept().unwrap();
                assert!(peer.ip().is_loopback());
            }
            // Joining a namespace needs CAP_SYS_ADMIN; without it the
            // error names the step.
            Err(why) => assert!(why.contains("join"), "{why}"),
        }
        drop(listener);
        let refused = dial_in_pod(own, port).await.unwrap_err();
        assert!(
            refused.contains("join") || refused.contains(&format!("127.0.0.1:{port}")),
            "{refused}"
        );
    }
}
