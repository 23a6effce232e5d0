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

/// Longest guest-written message kept, in characters.
pub const MAX_GUEST_MESSAGE_CHARS: usize = 512;

/// A message the guest wrote, made safe to log and to pass to containerd:
/// control characters (newlines first: they would forge log lines) are
/// escaped and the text is cut at [`MAX_GUEST_MESSAGE_CHARS`].
pub fn guest_text(message: &str) -> String {
    let mut out = String::new();
    let mut chars = message.chars();
    for c in chars.by_ref().take(MAX_GUEST_MESSAGE_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push_str("...(cut)");
    }
    out
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
                message: guest_text(status.message()),
            },
            source => ClientError::Transport { method, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_message_cannot_forge_a_log_line_or_grow_without_bound() {
        let forged = "failed\ntime=\"2026\" level=error msg=\"host compromised\"\r\x1b[2J";
        let safe = guest_text(forged);
        assert!(
            !safe.contains('\n') && !safe.contains('\r') && !safe.contains('\x1b'),
            "{safe}"
        );
        assert!(safe.starts_with("failed\\n"), "{safe}");
        let long = "x".repeat(10_000);
        let cut = guest_text(&long);
        assert_eq!(cut.len(), MAX_GUEST_MESSAGE_CHARS + "...(cut)".len());
        assert_eq!(guest_text("ünïcödé stays"), "ünïcödé stays");
    }

    #[test]
    fn an_rpc_status_message_is_made_safe() {
        let status = ttrpc::get_status(ttrpc::Code::INTERNAL, "a\nb".to_owned());
        let error = ClientError::from_ttrpc("CreateContainer", ttrpc::Error::RpcStatus(status));
        assert_eq!(error.to_string(), "CreateContainer: INTERNAL: a\\nb");
    }
}
