//! Confinement of husk's host-side threads.
//!
//! husk's device models run inside the shim, next to code that must stay
//! root (mounting rootfs, spawning the VMM). A bug in a device model, in
//! fuse-backend-rs or in one of our `unsafe` blocks must not give the guest
//! what the shim holds, so every thread that handles guest input confines
//! *itself* before it reads any, according to its [`ThreadClass`]:
//!
//! 1. `no_new_privs` (per thread; also what lets an unprivileged thread load
//!    a filter);
//! 2. capabilities: the bounding set and the effective, permitted and
//!    inheritable sets are cut to the class's list ([`caps`]);
//! 3. a seccomp allowlist for the class ([`syscalls`]), whose violation kills
//!    the whole shim (the default: a half-dead device is worse than a dead
//!    pod), or traps with a log line naming the call ([`trap`]).
//!
//! All of it is per thread, and threads a confined thread creates inherit
//! it, so a device's helper threads (vhost-user vring workers) are covered
//! by their creator's confinement.
//!
//! The process-wide [`Policy`] is set once by the shim from its
//! configuration ([`set_policy`]); until then [`confine_current_thread`]
//! does nothing, which keeps the device crates' own unit tests unconfined.

pub mod caps;
pub mod control;
mod namespace;
pub mod report;
pub mod rlimits;
pub mod syscalls;
pub mod trap;

mod filter;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use filter::FilterError;
pub use namespace::{enter_private_root, SHARE_INSIDE};

/// What a thread does, which decides what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadClass {
    /// A vCPU of the built-in VMM: `KVM_RUN` and the MMIO/PIO exits it
    /// emulates (which includes activating devices).
    Vcpu,
    /// A device's event thread: the vsock muxer, a vhost-user server and its
    /// vring workers, the console reader. Virtqueues and sockets, no files.
    Device,
    /// A virtio-fs worker: the passthrough's file operations on the share.
    FsWorker,
}

impl ThreadClass {
    /// Every class, in report order.
    pub const ALL: [ThreadClass; 3] = [Self::Vcpu, Self::Device, Self::FsWorker];

    /// The class's name in logs, reports and thread names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Device => "device",
            Self::FsWorker => "fs",
        }
    }
}

/// What a seccomp violation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationAction {
    /// `SECCOMP_RET_KILL_PROCESS`: the shim dies with SIGSYS; containerd sees
    /// the pod's tasks exit.
    Kill,
    /// `SECCOMP_RET_TRAP`: the call fails with ENOSYS and one line naming
    /// the thread and the call goes to the log (for finding a missing entry).
    Trap,
    /// `SECCOMP_RET_LOG`: allowed, and the kernel's audit log records it.
    Log,
}

/// The process-wide confinement settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Whether seccomp filters are installed at all (`seccomp = false` in
    /// the configuration turns them off for debugging; capabilities and
    /// `no_new_privs` still apply).
    pub seccomp: bool,
    /// What a violation does.
    pub action: ViolationAction,
    /// Whether virtio-fs threads serve from a private mount namespace whose
    /// root holds only the share ([`enter_private_root`]).
    pub fs_private_root: bool,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Sets the process's policy; the first call wins (one shim serves one
/// pod, whose configuration decides). Returns the policy in force.
pub fn set_policy(policy: Policy) -> Policy {
    let in_force = *POLICY.get_or_init(|| policy);
    if in_force.seccomp && in_force.action == ViolationAction::Trap {
        trap::install_handler();
    }
    in_force
}

/// The policy in force, if one was set.
pub fn policy() -> Option<Policy> {
    POLICY.get().copied()
}

/// Why a thread could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A prctl, capset or seccomp call failed.
    #[error("cannot confine the {class} thread: {what}: {source}")]
    Call {
        class: &'static str,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The class's filter could not be built.
    #[error("cannot confine the {class} thread: {source}")]
    Filter {
        class: &'static str,
        #[source]
        source: FilterError,
    },
}

/// Confines the calling thread as `class` under the process's policy (no
/// policy set: nothing happens). Call it first thing in the thread, before
/// it touches guest input; a thread that cannot be confined must not run.
pub fn confine_current_thread(class: ThreadClass) -> Result<(), ConfineError> {
    let Some(policy) = policy() else {
        return Ok(());
    };
    confine_with(class, policy)
}

/// Where a virtio-fs passthrough finds `share` from a thread confined by
/// [`confine_fs_thread`]: [`SHARE_INSIDE`] under a private root, the share
/// itself otherwise.
pub fn fs_root_for(share: &Path) -> PathBuf {
    match policy() {
        Some(policy) if policy.fs_private_root => PathBuf::from(SHARE_INSIDE),
        _ => share.to_owned(),
    }
}

/// Confines the calling virtio-fs thread, which serves `share`: first into
/// a private mount namespace rooted at it when the policy asks (see
/// [`enter_private_root`]; it needs CAP_SYS_ADMIN, which the next step
/// drops), then as [`ThreadClass::FsWorker`].
pub fn confine_fs_thread(share: &Path) -> Result<(), ConfineError> {
    let Some(policy) = policy() else {
        return Ok(());
    };
    if policy.fs_private_root {
        enter_private_root(share)?;
    }
    confine_with(ThreadClass::FsWorker, policy)
}

/// Confines the calling thread as `class` under `policy`.
pub fn confine_with(class: ThreadClass, policy: Policy) -> Result<(), ConfineError> {
    let call_error = |what: &'static str| ConfineError::Call {
        class: class.name(),
        what,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(call_error("set no_new_privs"));
    }
    caps::restrict_current_thread(caps::kept_by(class)).map_err(|source| ConfineError::Call {
        class: class.name(),
        what: "restrict capabilities",
        source,
    })?;
    if policy.seccomp {
        let program =
            filter::build(class, policy.action).map_err(|source| ConfineError::Filter {
                class: class.name(),
                source,
            })?;
        filter::install(&program).map_err(|source| ConfineError::Filter {
            class: class.name(),
            source,
        })?;
    }
    Ok(())
}
