//! The shim's configuration: a TOML file plus per-pod annotations.
//!
//! The file is found, in order, at the path in the runtime options'
//! `ConfigPath`, at `$HUSK_CONFIG`, or at `/etc/husk/configuration.toml`;
//! when none is set and the default file is absent, built-in defaults apply.
//! Unknown keys are errors, so a typo never silently does nothing. Pods may
//! ask for vCPUs and memory through Kata's annotations, within the limits
//! the operator sets here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use husk_devices::fs::{XattrPolicy, DEFAULT_MAX_OPEN_HANDLES, DEFAULT_MAX_OPEN_INODES};
use serde::{Deserialize, Serialize};

/// Where the documented default configuration is installed.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/configuration.toml";
/// Environment variable naming another configuration file.
pub const CONFIG_PATH_ENV: &str = "HUSK_CONFIG";
/// Pod annotation: vCPUs for the pod's VM.
pub const ANNOTATION_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
/// Pod annotation: memory for the pod's VM, in MiB.
pub const ANNOTATION_MEMORY_MIB: &str = "io.katacontainers.config.hypervisor.default_memory";

/// CRI sandbox annotation: the memory limit of the pod's containers, bytes.
pub const ANNOTATION_CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// CRI sandbox annotation: the CPU quota of the pod's containers, µs per period.
pub const ANNOTATION_CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CRI sandbox annotation: the CPU period of that quota, µs.
pub const ANNOTATION_CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Errors in finding, reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the husk configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid husk configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid husk configuration {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("annotation {annotation}={value} is not a whole number")]
    AnnotationNotANumber {
        annotation: &'static str,
        value: String,
    },
    #[error(
        "annotation {annotation}={value} is outside the allowed range {min}..={max} set by {limit}"
    )]
    AnnotationOutOfRange {
        annotation: &'static str,
        value: u64,
        min: u64,
        max: u64,
        limit: &'static str,
    },
    #[error("the pod's VM would need {asked} {unit} ({how}), above {limit} = {max}")]
    PodTooLarge {
        asked: u64,
        unit: &'static str,
        how: String,
        limit: &'static str,
        max: u64,
    },
}

/// Which VMM runs the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// `builtin` where the host's KVM runs stock guests, else `qemu`.
    #[default]
    Auto,
    /// The VMM inside the shim process.
    Builtin,
    /// `qemu-system-x86_64 -M microvm` with our vhost-user devices.
    Qemu,
}

/// Who QEMU runs as (`hypervisor.qemu_run_as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QemuRunAs {
    /// A uid and gid of its own per QEMU, from `qemu_id_first` and
    /// `qemu_id_count`, no supplementary groups but `/dev/kvm`'s under
    /// KVM, no capabilities.
    #[default]
    Unprivileged,
    /// Root, as the shim: for debugging only.
    Root,
}

impl<'de> Deserialize<'de> for QemuRunAs {
    /// "unprivileged" or "root", with an error that names the key.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = String::deserialize(deserializer)
            .map_err(|error| D::Error::custom(format!("hypervisor.qemu_run_as: {error}")))?;
        match value.as_str() {
            "unprivileged" => Ok(Self::Unprivileged),
            "root" => Ok(Self::Root),
            other => Err(D::Error::custom(format!(
                "hypervisor.qemu_run_as: {other:?} is neither \"unprivileged\" nor \"root\""
            ))),
        }
    }
}

/// `[hypervisor]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    pub kind: HypervisorKind,
    /// ELF vmlinux for the built-in VMM.
    pub kernel: PathBuf,
    /// The kernel QEMU boots: the ELF vmlinux through its PVH entry (the
    /// default: nothing to decompress in the guest) or a bzImage.
    pub qemu_kernel: PathBuf,
    pub initrd: PathBuf,
    /// QEMU binary; found on PATH when unset.
    pub qemu_binary: Option<PathBuf>,
    pub default_vcpus: u32,
    pub default_memory_mib: u64,
    /// A virtio-balloon with free page reporting: the guest hands the
    /// pages it frees back to the host (QEMU backend).
    pub free_page_reporting: bool,
    /// Who QEMU runs as.
    pub qemu_run_as: QemuRunAs,
    /// The first uid (and gid) of the range unprivileged QEMUs take theirs
    /// from.
    pub qemu_id_first: u32,
    /// How many ids the range holds: the most QEMUs the node runs at once.
    pub qemu_id_count: u32,
    /// Pre-booted templates (built-in VMM only): the first pod of a VM
    /// shape is snapshotted once its agent answers, and later pods of that
    /// shape are restored from the snapshot instead of booting
    /// (`hypervisor::template`).
    pub template: bool,
}

impl HypervisorConfig {
    /// `qemu_run_as` with its range, for the QEMU backend. The range was
    /// checked when the configuration was read; an invalid one (only
    /// possible in a configuration built in code) falls back to the
    /// default range rather than to root.
    pub fn qemu_run_as(&self) -> crate::hypervisor::qemu::RunAs {
        use crate::hypervisor::qemu::{IdRange, RunAs};
        match self.qemu_run_as {
            QemuRunAs::Root => RunAs::Root,
            QemuRunAs::Unprivileged => RunAs::Unprivileged(
                IdRange::new(self.qemu_id_first, self.qemu_id_count).unwrap_or(IdRange::DEFAULT),
            ),
        }
    }
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            kind: HypervisorKind::Auto,
            kernel: PathBuf::from("/usr/share/husk/vmlinux"),
            qemu_kernel: PathBuf::from("/usr/share/husk/vmlinux"),
            initrd: PathBuf::from("/usr/share/husk/initramfs.cpio.gz"),
            qemu_binary: None,
            default_vcpus: 1,
            default_memory_mib: 256,
            free_page_reporting: true,
            qemu_run_as: QemuRunAs::Unprivileged,
            qemu_id_first: crate::hypervisor::qemu::DEFAULT_QEMU_ID_FIRST,
            qemu_id_count: crate::hypervisor::qemu::DEFAULT_QEMU_ID_COUNT,
            template: false,
        }
    }
}

/// `[shared_fs]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedFsConfig {
    /// virtio-fs cache policy: never, metadata, auto or always.
    pub cache: String,
    /// virtio-fs xattr policy: mapped (guest security.*, trusted.* and
    /// system.* names stored under user.husk.guest. on the host) or off.
    #[serde(
        deserialize_with = "xattr_policy",
        serialize_with = "xattr_policy_name"
    )]
    pub xattr: XattrPolicy,
    /// Most inodes the guest may hold in the share (one host fd each).
    pub max_open_inodes: usize,
    /// Most files and directories the guest may have open in the share
    /// (one host fd each).
    pub max_open_handles: usize,
    /// Whether the guest may set setuid/setgid bits on host files.
    pub allow_setuid: bool,
    /// Size cap, in bytes, of the tmpfs holding the share's own tree (the
    /// container directories and mount points; the guest cannot write it).
    pub tree_max_bytes: u64,
    /// Inode cap of that tmpfs.
    pub tree_max_inodes: u64,
}

/// `shared_fs.xattr`: "mapped" or "off", nothing else (the boolean of
/// earlier versions included), with an error that names the key.
fn xattr_policy<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<XattrPolicy, D::Error> {
    use serde::de::Error;
    let value = String::deserialize(deserializer)
        .map_err(|error| D::Error::custom(format!("shared_fs.xattr: {error}")))?;
    value
        .parse()
        .map_err(|error| D::Error::custom(format!("shared_fs.xattr: {error}")))
}

/// `shared_fs.xattr` as the configuration file spells it.
fn xattr_policy_name<S: serde::Serializer>(
    policy: &XattrPolicy,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(policy.as_str())
}

/// Default `shared_fs.tree_max_bytes`: the tree holds directories and
/// empty mount-point files only, which take no data pages.
pub const DEFAULT_SHARE_TREE_MAX_BYTES: u64 = 1 << 20;
/// Default `shared_fs.tree_max_inodes`: about ten per container
/// (directory, rootfs, volumes and files) for hundreds of containers.
pub const DEFAULT_SHARE_TREE_MAX_INODES: u64 = 16_384;

impl Default for SharedFsConfig {
    fn default() -> Self {
        Self {
            cache: "auto".to_owned(),
            xattr: XattrPolicy::default(),
            max_open_inodes: DEFAULT_MAX_OPEN_INODES,
            max_open_handles: DEFAULT_MAX_OPEN_HANDLES,
            allow_setuid: false,
            tree_max_bytes: DEFAULT_SHARE_TREE_MAX_BYTES,
            tree_max_inodes: DEFAULT_SHARE_TREE_MAX_INODES,
        }
    }
}

/// `[timeouts]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// How long to wait for the agent to answer after the VM starts.
    pub agent_ready_ms: u64,
    /// How long a VM may take to power off before it is killed.
    pub shutdown_ms: u64,
    /// Deadline of every agent call but the long waits (a process's exit,
    /// the event stream), which the health check bounds instead.
    pub agent_call_ms: u64,
    /// Pause between two health probes (`Check`) of a running pod's agent.
    pub health_interval_ms: u64,
    /// How long one health probe may take.
    pub health_probe_ms: u64,
    /// Failed probes in a row after which the guest is declared dead: its
    /// VM is stopped and every running process reported exited (255).
    pub health_failures: u32,
    /// How long a `binary://` logging binary may take to signal that it is
    /// ready before Create fails and the binary is killed.
    pub logger_ready_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        // Software emulation (qemu with TCG) boots in seconds, not
        // milliseconds: leave room for it.
        Self {
            agent_ready_ms: 30_000,
            shutdown_ms: 5_000,
            agent_call_ms: 60_000,
            // Generous: several TCG guests on two cores answer slowly.
            health_interval_ms: 10_000,
            health_probe_ms: 5_000,
            health_failures: 3,
            logger_ready_ms: 10_000,
        }
    }
}

/// `[console]`: the guest's serial console on the host.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// The cap of `console.log` and of `console.log.1` each: a pod keeps
    /// at most twice this much console on the host.
    pub max_bytes: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            max_bytes: crate::hypervisor::console::DEFAULT_CONSOLE_MAX_BYTES,
        }
    }
}

/// What a seccomp violation of a confined thread does (`seccomp_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SeccompAction {
    /// The shim dies with SIGSYS; containerd sees the pod's tasks exit.
    #[default]
    Kill,
    /// The call fails with ENOSYS and one log line names thread and call.
    Trap,
    /// The call is allowed and the kernel's audit log records it.
    Log,
}

/// `[confinement]`: what the shim's guest-facing threads may do (see
/// `docs/architecture.md`, "Confinement").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfinementConfig {
    /// Seccomp allowlists per thread class; `false` only for debugging.
    pub seccomp: bool,
    /// What a call outside a thread's allowlist does.
    pub seccomp_action: SeccompAction,
    /// `RLIMIT_NOFILE` of the shim: every fd the device models may hold
    /// (the share's inode and handle caps, vsock connections) fits under it.
    pub max_open_files: u64,
    /// `RLIMIT_FSIZE` of the shim: the largest file the guest can make the
    /// share's passthrough write on the host; beyond it writes fail EFBIG.
    pub max_file_bytes: u64,
    /// Serve virtio-fs from threads in a private mount namespace whose root
    /// holds only the pod's share (and the shim's `/proc/self/fd`).
    pub fs_mount_namespace: bool,
    /// Place the shim and its VMM in the pod's cgroup (the sandbox's
    /// `linux.cgroupsPath`), so the pod pays for its VM.
    pub sandbox_cgroup: bool,
}

impl Default for ConfinementConfig {
    fn default() -> Self {
        Self {
            seccomp: true,
            seccomp_action: SeccompAction::Kill,
            max_open_files: 2 * 65536 + 4096,
            max_file_bytes: 64 << 30,
            fs_mount_namespace: true,
            sandbox_cgroup: true,
        }
    }
}

/// The most `limits.max_port_forward_connections` may be: half of the
/// VM's vsock connections, leaving the rest to stdio and the API.
pub const MAX_PORT_FORWARD_CONNECTIONS: usize = 512;

/// `[limits]`: what a pod may ask for through annotations.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodLimits {
    pub max_vcpus: u32,
    pub min_memory_mib: u64,
    pub max_memory_mib: u64,
    /// Size a pod's VM for the workload CRI announces in the sandbox's
    /// `io.kubernetes.cri.sandbox-*` annotations, on top of its base size.
    pub cri_sandbox_sizing: bool,
    /// CRI port-forward connections one pod carries at once; more are
    /// reset. Each holds two host fds and one vsock connection.
    pub max_port_forward_connections: usize,
}

impl Default for PodLimits {
    fn default() -> Self {
        Self {
            max_vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            min_memory_mib: 64,
            max_memory_mib: 16 * 1024,
            cri_sandbox_sizing: true,
            max_port_forward_connections: 128,
        }
    }
}

/// Log verbosity of the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

/// `shim_log_max_bytes` unless configured: the cap of the pod's
/// `shim.log` and of `shim.log.1` each.
pub const DEFAULT_SHIM_LOG_MAX_BYTES: u64 = 1024 * 1024;
/// The smallest `shim_log_max_bytes` accepted: a failed boot's lines and
/// the console tail they quote fit.
pub const MIN_SHIM_LOG_MAX_BYTES: u64 = 16 * 1024;
/// `debug_shell` unless configured: Debian's busybox-static.
pub const DEFAULT_DEBUG_SHELL: &str = "/bin/busybox";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log_level: LogLevel,
    /// The cap of the pod's own copy of the shim's log lines
    /// (`shim.log` and `shim.log.1` in the sandbox directory, read by
    /// `husk-ctl logs`).
    pub shim_log_max_bytes: u64,
    /// Whether `husk-ctl exec` may open a shell in the guest, outside the
    /// containers. Off by default: the shim then never asks the agent to
    /// serve one.
    pub debug_console: bool,
    /// The static shell appended to the initramfs of a pod whose debug
    /// console is on (the product initramfs has none).
    pub debug_shell: PathBuf,
    pub hypervisor: HypervisorConfig,
    pub shared_fs: SharedFsConfig,
    pub timeouts: TimeoutsConfig,
    pub limits: PodLimits,
    pub console: ConsoleConfig,
    pub confinement: ConfinementConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log_level: LogLevel::default(),
            shim_log_max_bytes: DEFAULT_SHIM_LOG_MAX_BYTES,
            debug_console: false,
            debug_shell: PathBuf::from(DEFAULT_DEBUG_SHELL),
            hypervisor: HypervisorConfig::default(),
            shared_fs: SharedFsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            limits: PodLimits::default(),
            console: ConsoleConfig::default(),
            confinement: ConfinementConfig::default(),
        }
    }
}

/// The virtio-fs cache policies the device understands.
const CACHE_POLICIES: [&str; 4] = ["never", "metadata", "auto", "always"];

impl Config {
    /// Parses and validates configuration text read from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Finds and loads the configuration: `explicit` (from the runtime
    /// options), then `$HUSK_CONFIG`, then the default path; built-in
    /// defaults when nothing is named and the default file is absent.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let from_env = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
        let named = explicit.map(Path::to_owned).or(from_env);
        let path = match named {
            Some(path) => path,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok((Self::default(), None)),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok((Self::from_toml(&text, &path)?, Some(path)))
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        if !CACHE_POLICIES.contains(&self.shared_fs.cache.as_str()) {
            return Err(invalid(
                "shared_fs.cache",
                format!(
                    "'{}' is not one of {}",
                    self.shared_fs.cache,
                    CACHE_POLICIES.join(", ")
                ),
            ));
        }
        if self.shared_fs.tree_max_bytes < 4096 {
            return Err(invalid(
                "shared_fs.tree_max_bytes",
                "must be at least 4096 (one page)".into(),
            ));
        }
        if self.shared_fs.tree_max_inodes < 16 {
            return Err(invalid(
                "shared_fs.tree_max_inodes",
                "must be at least 16".into(),
            ));
        }
        for (field, value) in [
            ("timeouts.agent_call_ms", self.timeouts.agent_call_ms),
            (
                "timeouts.health_interval_ms",
                self.timeouts.health_interval_ms,
            ),
            ("timeouts.health_probe_ms", self.timeouts.health_probe_ms),
            (
                "timeouts.health_failures",
                u64::from(self.timeouts.health_failures),
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        if self.hypervisor.template && self.hypervisor.kind == HypervisorKind::Qemu {
            return Err(invalid(
                "hypervisor.template",
                "needs the built-in VMM: the qemu backend (hypervisor.kind = \"qemu\") has no snapshots".into(),
            ));
        }
        if self.shim_log_max_bytes < MIN_SHIM_LOG_MAX_BYTES {
            return Err(invalid(
                "shim_log_max_bytes",
                format!(
                    "{} is below the minimum of {MIN_SHIM_LOG_MAX_BYTES} bytes",
                    self.shim_log_max_bytes
                ),
            ));
        }
        let min_console = crate::hypervisor::console::MIN_CONSOLE_MAX_BYTES;
        if self.console.max_bytes < min_console {
            return Err(invalid(
                "console.max_bytes",
                format!(
                    "{} is below the {min_console} bytes a kernel panic report needs",
                    self.console.max_bytes
                ),
            ));
        }
        if self.timeouts.logger_ready_ms == 0 {
            return Err(invalid(
                "timeouts.logger_ready_ms",
                "must be at least 1".into(),
            ));
        }
        if self.shared_fs.max_open_inodes == 0 {
            return Err(invalid(
                "shared_fs.max_open_inodes",
                "must be at least 1".into(),
            ));
        }
        if self.shared_fs.max_open_handles == 0 {
            return Err(invalid(
                "shared_fs.max_open_handles",
                "must be at least 1".into(),
            ));
        }
        if !(1..=MAX_PORT_FORWARD_CONNECTIONS).contains(&self.limits.max_port_forward_connections) {
            return Err(invalid(
                "limits.max_port_forward_connections",
                format!(
                    "{} is not between 1 and {MAX_PORT_FORWARD_CONNECTIONS} (each takes one of \
                     the VM's {} vsock connections, which stdio needs too)",
                    self.limits.max_port_forward_connections,
                    husk_devices::vsock::DEFAULT_MAX_CONNECTIONS
                ),
            ));
        }
        if self.limits.max_vcpus == 0 {
            return Err(invalid("limits.max_vcpus", "must be at least 1".into()));
        }
        if self.limits.min_memory_mib > self.limits.max_memory_mib {
            return Err(invalid(
                "limits.min_memory_mib",
                format!(
                    "{} exceeds limits.max_memory_mib {}",
                    self.limits.min_memory_mib, self.limits.max_memory_mib
                ),
            ));
        }
        if self.hypervisor.default_vcpus == 0
            || self.hypervisor.default_vcpus > self.limits.max_vcpus
        {
            return Err(invalid(
                "hypervisor.default_vcpus",
                format!(
                    "{} is outside 1..={}",
                    self.hypervisor.default_vcpus, self.limits.max_vcpus
                ),
            ));
        }
        if let Err(reason) = crate::hypervisor::qemu::IdRange::new(
            self.hypervisor.qemu_id_first,
            self.hypervisor.qemu_id_count,
        ) {
            return Err(invalid(
                "hypervisor.qemu_id_first/qemu_id_count",
                format!(
                    "{} ids from {}: {reason}",
                    self.hypervisor.qemu_id_count, self.hypervisor.qemu_id_first
                ),
            ));
        }
        let memory = self.hypervisor.default_memory_mib;
        if memory < self.limits.min_memory_mib || memory > self.limits.max_memory_mib {
            return Err(invalid(
                "hypervisor.default_memory_mib",
                format!(
                    "{memory} is outside {}..={}",
                    self.limits.min_memory_mib, self.limits.max_memory_mib
                ),
            ));
        }
        Ok(())
    }

    /// The VM size for a pod: the defaults, overridden by the pod's
    /// annotations within the configured limits.
    ///
    /// Under `limits.cri_sandbox_sizing` the workload CRI describes in the
    /// sandbox's annotations (`io.kubernetes.cri.sandbox-memory`, and
    /// `-cpu-quota` over `-cpu-period`) is added on top, as Kata's static
    /// sandbox sizing does: the VM holds the pod's containers plus its own
    /// base. A total above the limits is refused naming both numbers.
    pub fn vm_size_for(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<VmSize, ConfigError> {
        let base = self.base_vm_size_for(annotations)?;
        if !self.limits.cri_sandbox_sizing {
            return Ok(base);
        }
        let number = |annotation: &'static str| -> Result<Option<u64>, ConfigError> {
            annotations
                .get(annotation)
                .map(|value| {
                    value
                        .trim()
                        .parse::<i64>()
                        .map(|n| n.max(0) as u64)
                        .map_err(|_| ConfigError::AnnotationNotANumber {
                            annotation,
                            value: value.to_owned(),
                        })
                })
                .transpose()
        };
        let workload_mib =
            number(ANNOTATION_CRI_SANDBOX_MEMORY)?.map_or(0, |bytes| bytes.div_ceil(1 << 20));
        let workload_vcpus = match (
            number(ANNOTATION_CRI_SANDBOX_CPU_QUOTA)?,
            number(ANNOTATION_CRI_SANDBOX_CPU_PERIOD)?,
        ) {
            (Some(quota), Some(period)) if quota > 0 && period > 0 => quota.div_ceil(period),
            _ => 0,
        };
        let memory_mib = base.memory_mib + workload_mib;
        if memory_mib > self.limits.max_memory_mib {
            return Err(ConfigError::PodTooLarge {
                asked: memory_mib,
                unit: "MiB",
                how: format!(
                    "{} base + {workload_mib} of {ANNOTATION_CRI_SANDBOX_MEMORY}",
                    base.memory_mib
                ),
                limit: "limits.max_memory_mib",
                max: self.limits.max_memory_mib,
            });
        }
        let vcpus = u64::from(base.vcpus) + workload_vcpus;
        if vcpus > u64::from(self.limits.max_vcpus) {
            return Err(ConfigError::PodTooLarge {
                asked: vcpus,
                unit: "vCPUs",
                how: format!(
                    "{} base + {workload_vcpus} from {ANNOTATION_CRI_SANDBOX_CPU_QUOTA}/{ANNOTATION_CRI_SANDBOX_CPU_PERIOD}",
                    base.vcpus
                ),
                limit: "limits.max_vcpus",
                max: u64::from(self.limits.max_vcpus),
            });
        }
        Ok(VmSize {
            vcpus: vcpus as u32,
            memory_mib,
        })
    }

    /// The VM size before the CRI workload: the defaults, or the Kata
    /// annotations within the limits.
    fn base_vm_size_for(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<VmSize, ConfigError> {
        let vcpus = match annotations.get(ANNOTATION_VCPUS) {
            Some(value) => parse_within(
                ANNOTATION_VCPUS,
                value,
                1,
                u64::from(self.limits.max_vcpus),
                "limits.max_vcpus",
            )? as u32,
            None => self.hypervisor.default_vcpus,
        };
        let memory_mib = match annotations.get(ANNOTATION_MEMORY_MIB) {
            Some(value) => parse_within(
                ANNOTATION_MEMORY_MIB,
                value,
                self.limits.min_memory_mib,
                self.limits.max_memory_mib,
                "limits.min_memory_mib/max_memory_mib",
            )?,
            None => self.hypervisor.default_memory_mib,
        };
        Ok(VmSize { vcpus, memory_mib })
    }
}

fn parse_within(
    annotation: &'static str,
    value: &str,
    min: u64,
    max: u64,
    limit: &'static str,
) -> Result<u64, ConfigError> {
    let parsed: u64 = value
        .trim()
        .parse()
        .map_err(|_| ConfigError::AnnotationNotANumber {
            annotation,
            value: value.to_owned(),
        })?;
    if parsed < min || parsed > max {
        return Err(ConfigError::AnnotationOutOfRange {
            annotation,
            value: parsed,
            min,
            max,
            limit,
        });
    }
    Ok(parsed)
}

/// The resources of one pod's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_effective_configuration_written_as_toml_reads_back_the_same() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configuration.toml"))
                .unwrap();
        let path = std::path::Path::new("configuration.toml");
        let config = super::Config::from_toml(&text, path).unwrap();
        let written = toml::to_string(&config).unwrap();
        assert!(written.contains("xattr = \"mapped\""), "{written}");
        assert!(written.contains("kind = \"auto\""), "{written}");
        assert!(
            written.contains("qemu_run_as = \"unprivileged\"")
                && written.contains("qemu_id_first = 1879048192"),
            "{written}"
        );
        let again = super::Config::from_toml(&written, path).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), written);
    }

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/test/configuration.toml"))
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn templates_are_off_by_default_and_refused_with_the_qemu_backend() {
        assert!(!Config::default().hypervisor.template);
        let builtin = parse("[hypervisor]\nkind = \"builtin\"\ntemplate = true\n").unwrap();
        assert!(builtin.hypervisor.template);
        let auto = parse("[hypervisor]\ntemplate = true\n").unwrap();
        assert!(
            auto.hypervisor.template,
            "auto decides per host, at pod start"
        );
        let error = parse("[hypervisor]\nkind = \"qemu\"\ntemplate = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("hypervisor.template") && error.contains("no snapshots"),
            "{error}"
        );
    }

    #[test]
    fn cri_sandbox_annotations_add_the_workload_to_the_base_size() {
        let mut config = Config::default();
        config.limits.max_vcpus = 8;
        let size = config
            .vm_size_for(&annotations(&[
                (ANNOTATION_CRI_SANDBOX_MEMORY, "536870912"),
                (ANNOTATION_CRI_SANDBOX_CPU_QUOTA, "150000"),
                (ANNOTATION_CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]))
            .unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1 + 2,
                memory_mib: 256 + 512
            }
        );
        // No quota (-1 or absent): the base only; partial MiB round up.
        let size = config
            .vm_size_for(&annotations(&[
                (ANNOTATION_CRI_SANDBOX_MEMORY, "1"),
                (ANNOTATION_CRI_SANDBOX_CPU_QUOTA, "-1"),
                (ANNOTATION_CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]))
            .unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                memory_mib: 257
            }
        );
        config.limits.cri_sandbox_sizing = false;
        let size = config
            .vm_size_for(&annotations(&[(
                ANNOTATION_CRI_SANDBOX_MEMORY,
                "536870912",
            )]))
            .unwrap();
        assert_eq!(size.memory_mib, 256);
    }

    #[test]
    fn a_cri_workload_above_the_limits_is_refused_naming_both_numbers() {
        let mut config = Config::default();
        config.limits.max_vcpus = 2;
        let error = config
            .vm_size_for(&annotations(&[
                (ANNOTATION_CRI_SANDBOX_CPU_QUOTA, "400000"),
                (ANNOTATION_CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("5 vCPUs") && error.contains("limits.max_vcpus = 2"),
            "{error}"
        );
        let error = config
            .vm_size_for(&annotations(&[(ANNOTATION_CRI_SANDBOX_MEMORY, "x")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains(ANNOTATION_CRI_SANDBOX_MEMORY), "{error}");
        let error = config
            .vm_size_for(&annotations(&[(
                ANNOTATION_CRI_SANDBOX_MEMORY,
                &(64u64 << 30).to_string(),
            )]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("65792 MiB") && error.contains("limits.max_memory_mib = 16384"),
            "{error}"
        );
    }

    #[test]
    fn the_shipped_default_configuration_parses() {
        let text = include_str!("../configuration.toml");
        let config = parse(text).expect("configuration.toml is valid");
        assert_eq!(config.hypervisor.kind, HypervisorKind::Auto);
        assert_eq!(config.shared_fs.cache, "auto");
        assert_eq!(config.shared_fs.xattr, XattrPolicy::Mapped);
        assert_eq!(config.shared_fs.max_open_inodes, DEFAULT_MAX_OPEN_INODES);
        assert_eq!(config.shared_fs.max_open_handles, DEFAULT_MAX_OPEN_HANDLES);
    }

    #[test]
    fn an_unknown_hypervisor_is_rejected_naming_the_value() {
        let error = parse("[hypervisor]\nkind = \"xen\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("xen") && error.contains("/test/configuration.toml"),
            "{error}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = parse("[hypervisor]\nkernal = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("kernal"), "{error}");
    }

    #[test]
    fn a_bad_cache_policy_names_the_field() {
        let error = parse("[shared_fs]\ncache = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("shared_fs.cache") && error.contains("sometimes"),
            "{error}"
        );
    }

    #[test]
    fn xattr_is_mapped_by_default_and_only_mapped_or_off_is_accepted() {
        assert_eq!(parse("").unwrap().shared_fs.xattr, XattrPolicy::Mapped);
        assert_eq!(
            parse("[shared_fs]\nxattr = \"off\"\n")
                .unwrap()
                .shared_fs
                .xattr,
            XattrPolicy::Off
        );
        let error = parse("[shared_fs]\nxattr = \"on\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("shared_fs.xattr") && error.contains("on"),
            "{error}"
        );
        // The old boolean form is refused, naming the key.
        let error = parse("[shared_fs]\nxattr = true\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("shared_fs.xattr"), "{error}");
    }

    #[test]
    fn share_fd_limits_default_to_the_device_defaults_and_0_is_refused_naming_the_key() {
        let config = parse("").unwrap();
        assert_eq!(config.shared_fs.max_open_inodes, DEFAULT_MAX_OPEN_INODES);
        assert_eq!(config.shared_fs.max_open_handles, DEFAULT_MAX_OPEN_HANDLES);
        let config = parse("[shared_fs]\nmax_open_inodes = 100\nmax_open_handles = 50\n").unwrap();
        assert_eq!(
            (
                config.shared_fs.max_open_inodes,
                config.shared_fs.max_open_handles
            ),
            (100, 50)
        );
        for key in ["max_open_inodes", "max_open_handles"] {
            let error = parse(&format!("[shared_fs]\n{key} = 0\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("shared_fs.{key}")), "{error}");
        }
    }

    #[test]
    fn port_forward_connections_are_bounded_by_the_vsock_device_naming_the_key() {
        assert_eq!(parse("").unwrap().limits.max_port_forward_connections, 128);
        for bad in [0, MAX_PORT_FORWARD_CONNECTIONS + 1] {
            let error = parse(&format!("[limits]\nmax_port_forward_connections = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("limits.max_port_forward_connections")
                    && error.contains(&bad.to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn annotations_override_defaults_within_limits() {
        let config = parse("[limits]\nmax_vcpus = 4\n").unwrap();
        let mut annotations = HashMap::new();
        annotations.insert(ANNOTATION_VCPUS.to_owned(), "2".to_owned());
        annotations.insert(ANNOTATION_MEMORY_MIB.to_owned(), "512".to_owned());
        assert_eq!(
            config.vm_size_for(&annotations).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 512
            }
        );
        assert_eq!(config.vm_size_for(&HashMap::new()).unwrap().vcpus, 1);
    }

    #[test]
    fn a_pod_asking_for_10000_vcpus_is_refused() {
        let config = parse("[limits]\nmax_vcpus = 4\n").unwrap();
        let annotations = HashMap::from([(ANNOTATION_VCPUS.to_owned(), "10000".to_owned())]);
        let error = config.vm_size_for(&annotations).unwrap_err().to_string();
        assert!(
            error.contains("10000") && error.contains("limits.max_vcpus"),
            "{error}"
        );
        let annotations = HashMap::from([(ANNOTATION_MEMORY_MIB.to_owned(), "lots".to_owned())]);
        assert!(config
            .vm_size_for(&annotations)
            .unwrap_err()
            .to_string()
            .contains("lots"));
    }

    #[test]
    fn console_cap_and_logger_timeout_are_read_and_checked() {
        let config =
            parse("[console]\nmax_bytes = 65536\n[timeouts]\nlogger_ready_ms = 250\n").unwrap();
        assert_eq!(config.console.max_bytes, 65536);
        assert_eq!(config.timeouts.logger_ready_ms, 250);
        let defaults = parse("").unwrap();
        assert_eq!(defaults.console.max_bytes, 1024 * 1024);
        assert_eq!(defaults.timeouts.logger_ready_ms, 10_000);
        let error = parse("[console]\nmax_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("console.max_bytes") && error.contains("100"),
            "{error}"
        );
        let error = parse("[timeouts]\nlogger_ready_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("timeouts.logger_ready_ms"), "{error}");
    }

    #[test]
    fn qemu_runs_unprivileged_by_default_from_the_default_range() {
        use crate::hypervisor::qemu::{IdRange, RunAs};
        let config = parse("").unwrap();
        assert_eq!(config.hypervisor.qemu_run_as, QemuRunAs::Unprivileged);
        assert_eq!(
            config.hypervisor.qemu_run_as(),
            RunAs::Unprivileged(IdRange::DEFAULT)
        );
        let shipped = parse(include_str!("../configuration.toml")).unwrap();
        assert_eq!(
            shipped.hypervisor.qemu_run_as(),
            RunAs::Unprivileged(IdRange::DEFAULT)
        );
        let config = parse(
            "[hypervisor]\nqemu_run_as = \"unprivileged\"\nqemu_id_first = 200000\nqemu_id_count = 16\n",
        )
        .unwrap();
        assert_eq!(
            config.hypervisor.qemu_run_as(),
            RunAs::Unprivileged(IdRange::new(200_000, 16).unwrap())
        );
        let root = parse("[hypervisor]\nqemu_run_as = \"root\"\n").unwrap();
        assert_eq!(root.hypervisor.qemu_run_as(), RunAs::Root);
    }

    #[test]
    fn a_bad_qemu_run_as_or_id_range_names_the_setting() {
        let error = parse("[hypervisor]\nqemu_run_as = \"nobody\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("hypervisor.qemu_run_as") && error.contains("nobody"),
            "{error}"
        );
        let error = parse("[hypervisor]\nqemu_run_as = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("hypervisor.qemu_run_as"), "{error}");
        for (range, said) in [
            ("qemu_id_first = 0", "root"),
            ("qemu_id_count = 0", "count 0"),
            ("qemu_id_first = 60000\nqemu_id_count = 10000", "65534"),
            (
                "qemu_id_first = 4294967290\nqemu_id_count = 100",
                "4294967294",
            ),
        ] {
            let error = parse(&format!("[hypervisor]\n{range}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("hypervisor.qemu_id_first/qemu_id_count") && error.contains(said),
                "{range}: {error}"
            );
        }
    }

    #[test]
    fn an_unreadable_config_file_names_its_path() {
        let error = Config::load(Some(Path::new("/nonexistent/husk.toml")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/husk.toml"), "{error}");
    }
}
