//! The crate's error type. Every variant carries the id, path or spec field
//! that failed, so a message read alone (in a log, or on runc's stderr
//! format) says what to fix.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while creating or driving a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bundle's config.json is malformed or asks for something invalid.
    #[error("invalid config.json: field `{field}`: {message}")]
    InvalidSpec { field: String, message: String },
    /// A file system or I/O operation on `path` failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A system call failed; `what` names its object (path, namespace, id).
    #[error("{op} {what}: {source}")]
    Sys {
        op: &'static str,
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    /// A container id that is empty or contains path separators.
    #[error("invalid container id {0:?}: use letters, digits, '.', '_', '-', '+'")]
    InvalidId(String),
    /// `create` found a container with that id under the state root.
    #[error("container with id exists: {0}")]
    AlreadyExists(String),
    /// No state directory for that id.
    #[error("container does not exist")]
    NotFound(String),
    /// The operation is not allowed in the container's current status.
    #[error("container {id} is {status}: cannot {op}")]
    InvalidStatus {
        id: String,
        status: String,
        op: &'static str,
    },
    /// The container's init process reported a failure while being set up.
    #[error("unable to start container process: {0}")]
    Init(String),
    /// An OCI hook failed.
    #[error("{kind} hook {path}: {message}")]
    Hook {
        kind: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The seccomp profile could not be turned into a filter.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A cgroup operation failed.
    #[error("cgroup {path}: {message}")]
    Cgroup { path: PathBuf, message: String },
    /// A malformed argument given to an operation (signal name, user spec).
    #[error("{0}")]
    InvalidArgument(String),
    /// The mount table could not be read or has a malformed line (the
    /// message names the file and the line).
    #[error(transparent)]
    MountInfo(#[from] husk_mountinfo::Error),
}

impl Error {
    /// An [`Error::InvalidSpec`] for `field`.
    pub fn spec(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Error {
    /// The text a container init sends to the runtime, which wraps it in
    /// [`Error::Init`] again: without our own prefix, so it appears once.
    pub fn child_message(&self) -> String {
        match self {
            Error::Init(inner) => inner.clone(),
            other => other.to_string(),
        }
    }
}

/// Attach the failing operation and path to `io` and `nix` results.
pub trait Context<T> {
    /// Wrap the error with the operation and the path it acted on.
    fn at(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn at(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn at(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Sys {
            op,
            what: path.into().display().to_string(),
            source,
        })
    }
}

/// Wrap a bare `errno` result with an operation and a description.
pub fn sys<T>(res: nix::Result<T>, op: &'static str, what: impl std::fmt::Display) -> Result<T> {
    res.map_err(|source| Error::Sys {
        op,
        what: what.to_string(),
        source,
    })
}
