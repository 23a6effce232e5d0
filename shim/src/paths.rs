//! Where a sandbox keeps its host-side state: one directory per pod under
//! [`run_root`], holding the share, the guest console, the confinement
//! report and the cgroup record; and beside it one short directory per pod
//! for the VM backend ([`SandboxPaths::vm_dir`]: device sockets, QEMU's run
//! directory, the pid of a VMM process). A Unix socket address holds at
//! most 107 bytes and CRI's sandbox ids are 64 hex characters, so no socket
//! path may contain the id: the VM directory is named by a 16-hex digest of
//! it, and its length does not depend on the id. The `delete` action (after
//! the shim died) finds everything it must clean up from the id alone.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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

/// The longest socket path a backend makes below [`SandboxPaths::vm_dir`]
/// (`/q-<pid>-<n>/console.sock` and the device sockets), with room to spare.
pub const SOCKET_NAME_ROOM: usize = 48;
/// What a Unix socket address (`sun_path`) holds, without its NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// The host paths of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// The pod's state directory, `<run root>/<sandbox id>`.
    pub dir: PathBuf,
    /// The backend's directory, `<run root>/../vm/<16 hex of sha256(id)>`:
    /// short whatever the id, so the sockets in it fit `sun_path`.
    pub vm_dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(sandbox_id: &str) -> Self {
        Self::under(&run_root(), sandbox_id)
    }

    pub fn under(root: &Path, sandbox_id: &str) -> Self {
        let digest = Sha256::digest(sandbox_id.as_bytes());
        let short: String = digest[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Self {
            dir: root.join(sandbox_id),
            vm_dir: root.parent().unwrap_or(root).join("vm").join(short),
        }
    }

    /// Refuses a run root so long that the backend's sockets would not fit
    /// a Unix socket address, naming the path (the id never counts: see
    /// [`Self::vm_dir`]).
    pub fn check_socket_room(&self) -> Result<(), String> {
        let length = self.vm_dir.as_os_str().len();
        if length + SOCKET_NAME_ROOM > MAX_SOCKET_PATH {
            return Err(format!(
                "the VM directory {} is {length} bytes long: sockets below it would not fit the {MAX_SOCKET_PATH} bytes of a Unix socket address (shorten {RUN_ROOT_ENV}, whose parent holds it)",
                self.vm_dir.display()
            ));
        }
        Ok(())
    }

    /// The virtio-fs shared directory.
    pub fn share(&self) -> PathBuf {
        self.dir.join(crate::resources::GUEST_VIEW_DIR)
    }
    /// The hybrid vsock socket (host end of guest vsock).
    pub fn vsock_uds(&self) -> PathBuf {
        self.vm_dir.join("vsock.sock")
    }
    /// The confinement the pod's threads and VMM were found under right
    /// after boot (see `sandbox::write_confinement_report`).
    pub fn confinement_report(&self) -> PathBuf {
        self.dir.join("confinement.json")
    }
    /// The management socket (`crate::management`): in the VM directory,
    /// whose length does not depend on the id, so it always fits a socket
    /// address.
    pub fn management_socket(&self) -> PathBuf {
        self.vm_dir.join(crate::management::SOCKET_NAME)
    }
    /// The shim's own log lines of this pod (`shim.log`, rotated into
    /// `shim.log.1` at `shim_log_max_bytes`).
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    /// The guest console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The pid of a separate VMM process (QEMU), for cleanup after a crash.
    pub fn vmm_pid_file(&self) -> PathBuf {
        self.vm_dir.join(crate::hypervisor::qemu::VMM_PID_FILE)
    }
    /// Where the shim builds the share (a tmpfs only the host writes);
    /// [`Self::share`] is its read-only view.
    pub fn share_host_side(&self) -> PathBuf {
        self.dir.join(crate::resources::HOST_SIDE_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRI_ID: &str = "4f0c9a3e8b7d6c5a4f0c9a3e8b7d6c5a4f0c9a3e8b7d6c5a4f0c9a3e8b7d6c5a";

    #[test]
    fn the_vm_directory_of_a_cri_id_leaves_room_for_every_socket() {
        let paths = SandboxPaths::under(Path::new(DEFAULT_RUN_ROOT), CRI_ID);
        assert_eq!(paths.dir, Path::new("/run/husk/sandboxes").join(CRI_ID));
        assert!(paths.vm_dir.starts_with("/run/husk/vm"));
        assert_eq!(paths.vm_dir.file_name().unwrap().len(), 16);
        paths.check_socket_room().unwrap();
        // The same length whatever the id.
        let short = SandboxPaths::under(Path::new(DEFAULT_RUN_ROOT), "a");
        assert_eq!(
            short.vm_dir.as_os_str().len(),
            paths.vm_dir.as_os_str().len()
        );
        assert_ne!(short.vm_dir, paths.vm_dir);
        let longest = paths
            .vm_dir
            .join(format!("q-{}-{}", u32::MAX, u32::MAX))
            .join("console.sock");
        assert!(longest.as_os_str().len() <= MAX_SOCKET_PATH, "{longest:?}");
    }

    #[test]
    fn a_run_root_too_long_for_socket_addresses_is_refused_naming_it() {
        let root = Path::new("/tmp").join("r".repeat(80)).join("sandboxes");
        let error = SandboxPaths::under(&root, "pod")
            .check_socket_room()
            .unwrap_err();
        assert!(
            error.contains(&*root.parent().unwrap().to_string_lossy()),
            "{error}"
        );
        assert!(error.contains("107"), "{error}");
    }
}
