//! The client's errors: each names the endpoint, port or method that failed.

use std::path::PathBuf;

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to a Unix socket (the agent's, or the VM's vsock socket)
    /// failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The hybrid vsock handshake did not end in `OK <port>`.
    #[error("hybrid vsock {path}: CONNECT {port} was answered {reply:?}")]
    Handshake {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    /// The agent did not answer `Check` before the deadline.
    #[error("agent at {endpoint} not ready after {waited_ms} ms: {last_error}")]
    NotReady {
        endpoint: String,
        waited_ms: u128,
        last_error: String,
    },
    /// The agent answered a call with an error status.
    #[error("{method}: {code:?}: {message}")]
    Rpc {
        method: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    /// The call did not complete (connection lost, timeout, codec).
    #[error("{method}: transport: {source}")]
    Transport {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    /// A stream id the preamble cannot carry.
    #[error("invalid stdio stream id {0:?}")]
    InvalidStreamId(String),
    /// Writing a stdio stream's preamble failed.
    #[error("stdio stream {id}: cannot announce it: {source}")]
    Preamble {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The ttrpc status code when the agent answered with an error.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn from_ttrpc(method: &'static str, error: ttrpc::Error) -> Self {
        match error {
            ttrpc::Error::RpcStatus(status) => ClientError::Rpc {
                method,
                code: status.code(),
                message: status.message().to_owned(),
            },
            source => ClientError::Transport { method, source },
        }
    }
}
