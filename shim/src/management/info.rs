//! What `/info` answers: one sandbox as an operator lists it. The same
//! type reads the JSON back in `husk-ctl`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// CRI's annotation naming the pod (Kubernetes `metadata.name`).
pub const ANNOTATION_CRI_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// CRI's annotation naming the pod's Kubernetes namespace.
pub const ANNOTATION_CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

/// One running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub sandbox_id: String,
    /// containerd's namespace of the pod's tasks.
    pub namespace: String,
    pub backend: String,
    /// The accelerator and why it was chosen.
    pub accelerator: String,
    pub shim_pid: u32,
    /// The VMM's pid (the shim's own for the built-in VMM).
    pub vmm_pid: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// When the VM was started, Unix seconds.
    pub started_at_unix_s: u64,
    pub uptime_s: u64,
    /// The pod's containers, sorted.
    pub containers: Vec<String>,
    /// From the CRI annotations, when CRI made the pod.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// Whether `husk-ctl exec` can open the guest's debug shell.
    pub debug_console: bool,
    /// The guest console and the shim's own log of this pod.
    pub console_log: PathBuf,
    pub shim_log: PathBuf,
}
