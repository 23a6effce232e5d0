//! Host-side client of the husk agent API.
//!
//! [`AgentClient::connect`] reaches the agent either through the VM's hybrid
//! vsock socket (a Unix socket on the host; each connection starts with the
//! `CONNECT <port>\n` / `OK <host_port>\n` handshake) or, in host test mode,
//! directly through the agent's two Unix sockets. It retries until the agent
//! answers `Check` or the deadline passes. Calls are typed async methods;
//! process stdio travels on separate streams opened with
//! [`AgentClient::open_stdio`] and named in `StdioStreams`.

mod client;
mod error;
mod transport;

pub use client::{AgentClient, CallObserver, ExitStatus};
pub use error::ClientError;
pub use husk_protocols::agent;
pub use transport::{hybrid_vsock_connect, Endpoint};
pub use ttrpc::Code;
