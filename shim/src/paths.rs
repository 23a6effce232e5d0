//! Where a sandbox keeps its host-side state: one directory per pod under
//! [`run_root`], holding the share, the hybrid vsock socket, the guest
//! console, and the backend's own files (device sockets, the pid of a VMM
//! process that outlives nothing but the shim). The
//! `delete` action (after the shim died) finds everything it must clean up
//! from this directory alone.

use std::path::{Path, PathBuf};

/// Overrides the root of the sandbox directories (tests use a private one).
pub const RUN_ROOT_ENV: &str = "HUSK_RUN_DIR";
/// The default root of the sandbox directories.
pub const DEFAULT_RUN_ROOT: &str = "/run/husk/sandboxes";

/// The directory all sandbox directories live in.
pub fn run_root() -> PathBuf {
    std::env::var_os(RUN_ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_ROOT))
}

/// The host paths of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(sandbox_id: &str) -> Self {
        Self::under(&run_root(), sandbox_id)
    }

    pub fn under(root: &Path, sandbox_id: &str) -> Self {
        Self {
            dir: root.join(sandbox_id),
        }
    }

    /// The virtio-fs shared directory.
    pub fn share(&self) -> PathBuf {
        self.dir.join(crate::resources::GUEST_VIEW_DIR)
    }
    /// The hybrid vsock socket (host end of guest vsock).
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// The confinement the pod's threads and VMM were found under right
    /// after boot (see `sandbox::write_confinement_report`).
    pub fn confinement_report(&self) -> PathBuf {
        self.dir.join("confinement.json")
    }
    /// The guest console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The pid of a separate VMM process (QEMU), for cleanup after a crash.
    pub fn vmm_pid_file(&self) -> PathBuf {
        self.dir.join(crate::hypervisor::qemu::VMM_PID_FILE)
    }
    /// Where the shim builds the share (a tmpfs only the host writes);
    /// [`Self::share`] is its read-only view.
    pub fn share_host_side(&self) -> PathBuf {
        self.dir.join(crate::resources::HOST_SIDE_DIR)
    }
}
