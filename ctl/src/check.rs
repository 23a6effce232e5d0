//! `husk-ctl check`: whether this host can run husk pods, and which backend
//! `hypervisor.kind = "auto"` picks, one verdict per line.
//!
//! Each check reads the host (device nodes, `/sys`, binaries' versions, the
//! containerd configuration) and the husk configuration the shim would
//! load; nothing is changed. A `FAIL` line means pods cannot start; a
//! `warn` line names something that works differently or needs an
//! operator's attention. The exit status is 1 when any line failed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use husk_shim::config::{Config, HypervisorKind};
use husk_shim::hypervisor::Backend;
use husk_vmm::host::{probe_host_kvm, HostKvm};

/// The KVM API version every KVM since Linux 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Where containerd's configuration is read unless `--containerd-config`.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The runtime type containerd must name for husk.
const RUNTIME_TYPE: &str = "io.containerd.kata.v2";

/// A line's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        })
    }
}

/// One checked thing and what was found.
#[derive(Debug, Clone)]
pub struct Line {
    pub verdict: Verdict,
    pub what: &'static str,
    pub detail: String,
}

fn line(verdict: Verdict, what: &'static str, detail: impl Into<String>) -> Line {
    Line {
        verdict,
        what,
        detail: detail.into(),
    }
}

/// What `check` reads besides the host itself.
pub struct Inputs {
    /// The husk configuration (None: the shim's own search: `$HUSK_CONFIG`,
    /// then `/etc/husk/configuration.toml`, then built-in defaults).
    pub config: Option<PathBuf>,
    pub containerd_config: PathBuf,
}

/// Runs every check, in the order they are printed.
pub fn run(inputs: &Inputs) -> Vec<Line> {
    let mut lines = Vec::new();
    let config = match Config::load(inputs.config.as_deref()) {
        Ok((config, path)) => {
            let source = path.map_or_else(
                || "built-in defaults (no configuration file found)".to_owned(),
                |path| path.display().to_string(),
            );
            lines.push(line(Verdict::Ok, "configuration", source));
            Some(config)
        }
        Err(error) => {
            lines.push(line(Verdict::Fail, "configuration", error.to_string()));
            None
        }
    };
    let host = probe_host_kvm();
    lines.push(check_kvm(&host));
    lines.push(check_device(
        "tun",
        Path::new("/dev/net/tun"),
        "the pod's TAP for virtio-net",
    ));
    lines.push(check_vsock());
    lines.push(check_cgroups());
    let backend = config.as_ref().map(|config| {
        let (backend, reason) = Backend::resolve(config.hypervisor.kind, &host);
        lines.push(line(
            Verdict::Ok,
            "backend",
            format!(
                "{} ({reason}; hypervisor.kind = {})",
                backend.name(),
                kind_name(config.hypervisor.kind)
            ),
        ));
        backend
    });
    if let Some(config) = &config {
        lines.extend(check_artifacts(config, backend));
        if backend == Some(Backend::Qemu) {
            lines.push(check_qemu(config));
        }
    }
    lines.extend(check_containerd(&inputs.containerd_config));
    lines
}

fn kind_name(kind: HypervisorKind) -> &'static str {
    match kind {
        HypervisorKind::Auto => "auto",
        HypervisorKind::Builtin => "builtin",
        HypervisorKind::Qemu => "qemu",
    }
}

/// `/dev/kvm`: opens, API version 12, a VM can be created, and whether
/// stock guests run (hardware) or not (PVM).
fn check_kvm(host: &HostKvm) -> Line {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(error) => {
            return line(
                Verdict::Warn,
                "kvm",
                format!(
                    "cannot open /dev/kvm ({error}): pods run under QEMU with TCG (software emulation), seconds per start"
                ),
            )
        }
    };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return line(
            Verdict::Fail,
            "kvm",
            format!("/dev/kvm reports API version {version}, not {KVM_API_VERSION}"),
        );
    }
    if let Err(error) = kvm.create_vm() {
        return line(
            Verdict::Fail,
            "kvm",
            format!("API version {version}, but KVM_CREATE_VM fails: {error}"),
        );
    }
    match host {
        HostKvm::Hardware => line(
            Verdict::Ok,
            "kvm",
            format!("API version {version}, VM created; hardware-assisted: the built-in VMM runs full guests"),
        ),
        HostKvm::Pvm => line(
            Verdict::Warn,
            "kvm",
            format!(
                "API version {version}, VM created; PVM (kvm_pvm, shadow paging): a stock guest kernel stops after its early boot here, so pods run under QEMU with TCG"
            ),
        ),
        HostKvm::Unavailable { reason } => line(Verdict::Warn, "kvm", reason.clone()),
    }
}

/// A device node the product opens read-write.
fn check_device(what: &'static str, path: &Path, used_for: &str) -> Line {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => line(
            Verdict::Ok,
            what,
            format!("{} opens ({used_for})", path.display()),
        ),
        Err(error) => line(
            Verdict::Fail,
            what,
            format!("cannot open {}: {error} ({used_for})", path.display()),
        ),
    }
}

/// husk's vsock is hybrid: Unix sockets on the host, no vhost-vsock.
fn check_vsock() -> Line {
    let vhost = Path::new("/dev/vhost-vsock").exists();
    line(
        Verdict::Ok,
        "vsock",
        format!(
            "hybrid vsock over Unix sockets, served by the shim: no host vsock module needed (/dev/vhost-vsock {})",
            if vhost { "present, unused" } else { "absent" }
        ),
    )
}

/// Which cgroup hierarchy the host runs.
fn check_cgroups() -> Line {
    let unified_root = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let unified_under = Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists();
    match (unified_root, unified_under) {
        (true, _) => line(Verdict::Ok, "cgroups", "cgroup v2 (unified)"),
        (false, true) => line(
            Verdict::Warn,
            "cgroups",
            "cgroup v1 with v2 under /sys/fs/cgroup/unified (hybrid): pods are charged through the v1 hierarchies; the guests use v2",
        ),
        (false, false) => line(
            Verdict::Warn,
            "cgroups",
            "cgroup v1 only: pods are charged through the v1 hierarchies; the guests use v2",
        ),
    }
}

/// The guest artifacts the chosen backend boots.
fn check_artifacts(config: &Config, backend: Option<Backend>) -> Vec<Line> {
    let kernel = match backend {
        Some(Backend::Builtin) => ("hypervisor.kernel", &config.hypervisor.kernel),
        _ => ("hypervisor.qemu_kernel", &config.hypervisor.qemu_kernel),
    };
    [kernel, ("hypervisor.initrd", &config.hypervisor.initrd)]
        .into_iter()
        .map(|(setting, path)| match std::fs::File::open(path) {
            Ok(file) => {
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                line(Verdict::Ok, "guest", format!("{setting} = {} ({bytes} bytes)", path.display()))
            }
            Err(error) => line(
                Verdict::Fail,
                "guest",
                format!(
                    "{setting} = {} is not readable: {error} (`make install` installs the guest kernel and initramfs)",
                    path.display()
                ),
            ),
        })
        .collect()
}

/// The QEMU binary the qemu backend runs, and its version.
fn check_qemu(config: &Config) -> Line {
    let binary = config
        .hypervisor
        .qemu_binary
        .clone()
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    match Command::new(&binary).arg("--version").output() {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            line(
                Verdict::Ok,
                "qemu",
                format!(
                    "{}: {}",
                    binary.display(),
                    text.lines().next().unwrap_or("").trim()
                ),
            )
        }
        Ok(output) => line(
            Verdict::Fail,
            "qemu",
            format!("{} --version exited {}", binary.display(), output.status),
        ),
        Err(error) => line(
            Verdict::Fail,
            "qemu",
            format!(
                "cannot run {}: {error} (the qemu backend needs qemu-system-x86_64: `make deps`)",
                binary.display()
            ),
        ),
    }
}

/// containerd's version, and whether its configuration names husk.
fn check_containerd(config_path: &Path) -> Vec<Line> {
    let mut lines = Vec::new();
    match Command::new("containerd").arg("--version").output() {
        Ok(output) if output.status.success() => lines.push(line(
            Verdict::Ok,
            "containerd",
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        )),
        Ok(output) => lines.push(line(
            Verdict::Warn,
            "containerd",
            format!("containerd --version exited {}", output.status),
        )),
        Err(error) => lines.push(line(
            Verdict::Warn,
            "containerd",
            format!("cannot run containerd: {error}"),
        )),
    }
    match std::fs::read_to_string(config_path) {
        Ok(text) if text.contains(RUNTIME_TYPE) => lines.push(line(
            Verdict::Ok,
            "containerd config",
            format!("{} names runtime_type {RUNTIME_TYPE}", config_path.display()),
        )),
        Ok(_) => lines.push(line(
            Verdict::Warn,
            "containerd config",
            format!(
                "{} does not name {RUNTIME_TYPE}: CRI pods cannot ask for husk (add shim/containerd-snippet.toml); ctr --runtime still works",
                config_path.display()
            ),
        )),
        Err(error) => lines.push(line(
            Verdict::Warn,
            "containerd config",
            format!(
                "cannot read {}: {error}: CRI pods cannot ask for husk until it names {RUNTIME_TYPE}",
                config_path.display()
            ),
        )),
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_containerd_config_without_the_runtime_type_is_a_warning_naming_it() {
        let dir = husk_test_support::tempdir::TestDir::new("husk-ctl-unit").unwrap();
        let config = dir.join("config.toml");
        std::fs::write(&config, "version = 2\n").unwrap();
        let lines = check_containerd(&config);
        let named = lines
            .iter()
            .find(|l| l.what == "containerd config")
            .unwrap();
        assert_eq!(named.verdict, Verdict::Warn);
        assert!(named.detail.contains(RUNTIME_TYPE), "{}", named.detail);
        std::fs::write(
            &config,
            "[plugins.cri.containerd.runtimes.kata]\nruntime_type = \"io.containerd.kata.v2\"\n",
        )
        .unwrap();
        let lines = check_containerd(&config);
        let named = lines
            .iter()
            .find(|l| l.what == "containerd config")
            .unwrap();
        assert_eq!(named.verdict, Verdict::Ok);
    }

    #[test]
    fn verdicts_print_as_the_report_shows_them() {
        assert_eq!(
            [Verdict::Ok, Verdict::Warn, Verdict::Fail].map(|v| v.to_string()),
            ["ok", "warn", "FAIL"]
        );
    }
}
