//! What can go wrong in the pod model, each kind mapped to the ttrpc code
//! containerd expects (`NOT_FOUND` for a finished process, say).

use containerd_shim_protos::ttrpc::Code;
use husk_agent_client::ClientError;

/// An error of the pod model; its message is what containerd's client sees.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    /// The guest agent refused or failed a call.
    #[error("{what}: {source}")]
    Agent {
        what: &'static str,
        source: ClientError,
    },
    /// The host side failed.
    #[error("{what}: {source:#}")]
    Internal {
        what: &'static str,
        source: anyhow::Error,
    },
}

impl PodError {
    /// The ttrpc status code for containerd.
    pub fn code(&self) -> Code {
        match self {
            PodError::NotFound(_) => Code::NOT_FOUND,
            PodError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            PodError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            PodError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            PodError::Unimplemented(_) => Code::UNIMPLEMENTED,
            PodError::Agent { source, .. } => source.code().unwrap_or(Code::UNAVAILABLE),
            PodError::Internal { .. } => Code::INTERNAL,
        }
    }

    /// An agent error under `what`.
    pub fn agent(what: &'static str) -> impl FnOnce(ClientError) -> PodError {
        move |source| PodError::Agent { what, source }
    }

    /// A host-side error under `what`.
    pub fn internal<E: Into<anyhow::Error>>(what: &'static str) -> impl FnOnce(E) -> PodError {
        move |source| PodError::Internal {
            what,
            source: source.into(),
        }
    }

    /// Bad input, with the full context chain in the message.
    pub fn invalid<E: Into<anyhow::Error>>(error: E) -> PodError {
        PodError::InvalidArgument(format!("{:#}", error.into()))
    }
}
