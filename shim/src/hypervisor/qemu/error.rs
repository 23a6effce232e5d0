//! Why starting a QEMU guest failed. Every variant names the file, option or
//! binary involved, so the message alone says what to fix.

use std::path::PathBuf;
use std::process::ExitStatus;

use super::binary::QemuVersion;
use super::qmp::QmpError;

/// Errors of the `qemu` backend.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// No `qemu-system-x86_64` on `PATH`.
    #[error(
        "qemu-system-x86_64 was not found on PATH ({path}): install Debian's \
         qemu-system-x86 package (`make deps` does)"
    )]
    NotFound { path: String },
    /// The configured QEMU binary does not exist.
    #[error(
        "the QEMU binary {binary} does not exist: install Debian's qemu-system-x86 \
         package or configure another binary"
    )]
    BinaryMissing { binary: PathBuf },
    /// `qemu --version` could not be run.
    #[error("cannot run `{binary} --version`: {source}; install Debian's qemu-system-x86 package")]
    VersionCommand {
        binary: PathBuf,
        source: std::io::Error,
    },
    /// `qemu --version` printed something that is not a QEMU version.
    #[error("`{binary} --version` printed no QEMU version: {output:?}")]
    VersionUnparseable { binary: PathBuf, output: String },
    /// QEMU is older than the oldest version the backend was verified with.
    #[error(
        "{binary} is QEMU {found}, husk needs {required} or newer (microvm with \
         memory-backend and vhost-user devices): install Debian 12's qemu-system-x86 package"
    )]
    VersionTooOld {
        binary: PathBuf,
        found: QemuVersion,
        required: QemuVersion,
    },
    /// A file the guest boots from is missing.
    #[error("the {what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    /// A vhost-user device's socket is not there: its server is not running.
    #[error(
        "the vhost-user {device} socket {path} does not exist: start the device's \
         vhost-user server before the VM"
    )]
    VhostUserSocketMissing { device: &'static str, path: PathBuf },
    /// A Unix socket path longer than `sun_path` allows.
    #[error("the socket path {path} is longer than the {max} bytes a Unix socket address holds")]
    SocketPathTooLong { path: PathBuf, max: usize },
    /// A configuration value QEMU would reject.
    #[error("invalid QEMU option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    /// The VM's run directory could not be created.
    #[error("cannot create the VM run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The console log or QEMU's output file could not be created.
    #[error("cannot create {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A socket pair for QEMU's console or QMP could not be made.
    #[error("cannot make the socket pair for QEMU's {what}: {source}")]
    SocketPair {
        what: &'static str,
        source: std::io::Error,
    },
    /// The backend could not connect, on QEMU's behalf, to a vhost-user
    /// device's server.
    #[error("cannot connect to the vhost-user {device} socket {path} for QEMU: {source}")]
    VhostUserConnect {
        device: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// QEMU's identity cannot open a file it needs.
    #[error(
        "QEMU, running as {identity}, cannot open the {what} {path}: {source} (make it and \
         every directory above it readable by that user, or see {setting})"
    )]
    NotAccessible {
        what: &'static str,
        path: PathBuf,
        identity: String,
        setting: &'static str,
        source: std::io::Error,
    },
    /// Every uid of the configured range is held by another QEMU or used
    /// by a process.
    #[error(
        "no free uid for QEMU among the {count} ids from {first}: {held} held by other husk \
         QEMUs, the rest used by running processes; enlarge the range ({setting})"
    )]
    NoFreeUid {
        first: u32,
        count: u32,
        held: u32,
        setting: &'static str,
    },
    /// The lease file that holds a uid (or its directory) is unusable.
    #[error("cannot hold QEMU's uid through {name}: {source}")]
    UidLease {
        name: String,
        source: std::io::Error,
    },
    /// The paused guest could not be resumed.
    #[error("cannot resume the paused guest with QMP cont: {source}")]
    Resume { source: QmpError },
    /// The QEMU process could not be started.
    #[error("cannot start {binary} as {identity}: {source}")]
    Spawn {
        binary: PathBuf,
        identity: String,
        source: std::io::Error,
    },
    /// QEMU exited before its QMP monitor answered.
    #[error("QEMU exited during startup ({status}); its output: {output}")]
    ExitedAtStart { status: ExitStatus, output: String },
    /// QEMU's QMP monitor did not come up on its socket pair.
    #[error("cannot talk to QEMU's QMP monitor: {source}")]
    Qmp { source: QmpError },
}
