//! The agent API's errors. Each variant carries the id or path that failed,
//! and maps to the ttrpc status code the host acts on (NOT_FOUND,
//! ALREADY_EXISTS, INVALID_ARGUMENT, ...). A request error never ends the
//! agent: it is logged and returned.

use std::path::PathBuf;

use ttrpc::Code;

/// Everything an agent request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// An id (container, exec, sandbox) that is empty, too long, or not
    /// made of letters, digits, '.', '_' and '-'.
    #[error("invalid {kind} id {id:?}: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    InvalidId { kind: &'static str, id: String },
    /// No container with that id.
    #[error("container {0} not found")]
    ContainerNotFound(String),
    /// No process with that exec id in the container.
    #[error("process {exec_id} not found in container {container_id}")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    /// The process has exited already.
    #[error("process {exec_id:?} of container {container_id} has exited")]
    ProcessExited {
        container_id: String,
        exec_id: String,
    },
    /// A container or exec with that id exists.
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// A host-supplied path that leaves the shared directory.
    #[error("path {path:?} escapes the shared directory {share}")]
    PathEscapesShare { path: String, share: PathBuf },
    /// A malformed or contradictory request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A resource request the guest cannot satisfy.
    #[error("the guest cannot satisfy {what}: {why}")]
    Unsatisfiable { what: String, why: String },
    /// The operation does not fit the current state (no sandbox yet, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A named stdio stream did not arrive in time.
    #[error("stdio stream {id} was not opened within {waited_ms} ms")]
    StreamMissing { id: String, waited_ms: u64 },
    /// The runtime crate refused or failed.
    #[error("container {id}: {op}: {source}")]
    Runtime {
        id: String,
        op: &'static str,
        #[source]
        source: husk_runtime::Error,
    },
    /// The runtime helper process failed.
    #[error("container {id}: {op}: {message}")]
    Helper {
        id: String,
        op: &'static str,
        message: String,
        code: Code,
    },
    /// A file or system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// The ttrpc status code the host sees.
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidId { .. }
            | AgentError::PathEscapesShare { .. }
            | AgentError::InvalidRequest(_) => Code::INVALID_ARGUMENT,
            AgentError::ContainerNotFound(_)
            | AgentError::ProcessNotFound { .. }
            | AgentError::ProcessExited { .. } => Code::NOT_FOUND,
            AgentError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            AgentError::Unsatisfiable { .. } => Code::OUT_OF_RANGE,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::StreamMissing { .. } => Code::DEADLINE_EXCEEDED,
            AgentError::Runtime { source, .. } => runtime_code(source),
            AgentError::Helper { code, .. } => *code,
            AgentError::Io { .. } => Code::INTERNAL,
        }
    }

    /// An [`AgentError::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| AgentError::Io { op, path, source }
    }
}

/// The status code for a runtime error.
pub fn runtime_code(error: &husk_runtime::Error) -> Code {
    use husk_runtime::Error as E;
    match error {
        E::NotFound(_) => Code::NOT_FOUND,
        E::AlreadyExists(_) => Code::ALREADY_EXISTS,
        E::InvalidSpec { .. } | E::InvalidId(_) | E::InvalidArgument(_) | E::Seccomp(_) => {
            Code::INVALID_ARGUMENT
        }
        E::InvalidStatus { .. } => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(error: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(error.code(), error.to_string()))
    }
}

/// Result alias of the agent's request handling.
pub type Result<T> = std::result::Result<T, AgentError>;
