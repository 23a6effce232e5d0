//! The hypervisor seam: one trait, [`Hypervisor`], that every backend
//! implements, so the sandbox never names a VMM.
//!
//! A pod's VM is described once, by [`VmSpec`] (size, kernel, initramfs,
//! console, and the one place the guest kernel command line is built), and
//! given its devices as [`Device`]s before it starts. The configuration's
//! `hypervisor.kind = "auto"` is resolved by [`Backend::resolve`] before
//! anything starts, into a [`Backend`] that has no `auto`.
//!
//! | module | backend |
//! | --- | --- |
//! | [`builtin`] | the VMM inside this process (`husk_vmm`), devices on virtio-mmio |
//! | [`qemu`] | `qemu-system-x86_64 -M microvm`, the same device models over vhost-user from threads of this process |
//!
//! Both backends write the guest console through [`console`], which caps
//! it on the host. A [`Launcher`] turns a backend and a spec into a VM;
//! tests give the sandbox a launcher of fakes instead.

pub mod builtin;
pub mod console;
pub mod qemu;
pub mod template;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use husk_agent_client::Endpoint;
use husk_devices::fs::FsConfig;
use husk_vmm::host::HostKvm;

use crate::config::{Config, HypervisorKind, VmSize};

/// The guest's vsock context id (the first one not reserved).
pub const GUEST_CID: u64 = 3;
/// The virtio-fs tag of the pod's share (the name Kata uses too).
pub const SHARED_FS_TAG: &str = "kataShared";
/// Kernel parameters every husk guest gets: the console on the first
/// serial port, and no boot chatter on it.
const BASE_CMDLINE: &str = "console=ttyS0 quiet";

/// A backend that can run a pod: what `auto` resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The VMM inside the shim process.
    Builtin,
    /// `qemu-system-x86_64 -M microvm` with our vhost-user devices.
    Qemu,
}

impl Backend {
    /// The backend a configured kind means on this host, and why.
    pub fn resolve(kind: HypervisorKind, host: &HostKvm) -> (Backend, String) {
        match kind {
            HypervisorKind::Auto if host.runs_stock_guests() => (
                Backend::Builtin,
                format!("auto: {}, so the built-in VMM", host.describe()),
            ),
            HypervisorKind::Auto => (
                Backend::Qemu,
                format!(
                    "auto: {}, so qemu (with TCG where KVM cannot run the guest)",
                    host.describe()
                ),
            ),
            HypervisorKind::Builtin => (Backend::Builtin, "set in the configuration".to_owned()),
            HypervisorKind::Qemu => (Backend::Qemu, "set in the configuration".to_owned()),
        }
    }

    /// The name used in the configuration and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Builtin => "builtin",
            Backend::Qemu => "qemu",
        }
    }

    /// How the guest ends itself so that the VMM notices: the built-in VMM
    /// ends on the i8042 reset line; QEMU (`-no-reboot`) on a triple fault.
    /// A panic reboots, which ends the VM the same way.
    fn power_off_parameters(self) -> &'static str {
        match self {
            Backend::Builtin => "reboot=k panic=1",
            Backend::Qemu => "reboot=t panic=-1",
        }
    }
}

/// Everything about a pod's VM that does not depend on its backend's
/// implementation: one description type for every backend.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub backend: Backend,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The guest kernel in the form the backend loads (ELF vmlinux for the
    /// built-in VMM, bzImage for QEMU).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Where the guest's serial console is written (see [`console`]).
    pub console_log: PathBuf,
    /// The cap of each of the console's two files (`console.max_bytes`).
    pub console_max_bytes: u64,
    /// A directory the backend may put its own files in (sockets, QEMU's
    /// run directory, the VMM pid); short whatever the sandbox id
    /// (`SandboxPaths::vm_dir`), removed with the sandbox.
    pub work_dir: PathBuf,
    /// The QEMU binary; found on PATH when unset.
    pub qemu_binary: Option<PathBuf>,
    /// Seccomp for the VMM (`confinement.seccomp`): QEMU's `-sandbox`.
    pub seccomp: bool,
    /// Free page reporting (`hypervisor.free_page_reporting`).
    pub free_page_reporting: bool,
    /// Who QEMU runs as (`hypervisor.qemu_run_as` and its id range).
    pub qemu_run_as: qemu::RunAs,
    /// Where pre-booted templates live, when this VM may restore from one
    /// or become one (`hypervisor.template`, built-in VMM only).
    pub template_root: Option<PathBuf>,
}

/// Why a VM could not be described, started or given a device.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A guest artifact named by the configuration is missing.
    #[error("{setting} = {path} is not a readable file ({source_of_setting}); `make install` installs the guest kernel and initramfs")]
    MissingArtifact {
        setting: &'static str,
        path: PathBuf,
        source_of_setting: String,
    },
    /// The backend cannot run a VM of this size.
    #[error("the {backend} backend cannot run {what}")]
    Unsupported { backend: &'static str, what: String },
    /// A device was added after the VM started, or twice.
    #[error("cannot add the {device} device: {reason}")]
    Device {
        device: &'static str,
        reason: String,
    },
    /// The backend failed.
    #[error("{0:#}")]
    Backend(#[from] anyhow::Error),
}

impl VmSpec {
    /// The spec of a pod's VM from the configuration (`config_path` names
    /// where it came from, for errors), refusing missing guest artifacts.
    pub fn for_pod(
        config: &Config,
        config_path: Option<&Path>,
        backend: Backend,
        size: VmSize,
        work_dir: &Path,
        console_log: &Path,
    ) -> Result<Self, HypervisorError> {
        let kernel = match backend {
            Backend::Builtin => ("hypervisor.kernel", &config.hypervisor.kernel),
            Backend::Qemu => ("hypervisor.qemu_kernel", &config.hypervisor.qemu_kernel),
        };
        for (setting, path) in [kernel, ("hypervisor.initrd", &config.hypervisor.initrd)] {
            if !path.is_file() {
                return Err(HypervisorError::MissingArtifact {
                    setting,
                    path: path.clone(),
                    source_of_setting: config_path.map_or_else(
                        || "the built-in default".to_owned(),
                        |p| format!("set in {}", p.display()),
                    ),
                });
            }
        }
        Ok(Self {
            backend,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            kernel: kernel.1.clone(),
            initrd: config.hypervisor.initrd.clone(),
            console_log: console_log.to_owned(),
            console_max_bytes: config.console.max_bytes,
            work_dir: work_dir.to_owned(),
            qemu_binary: config.hypervisor.qemu_binary.clone(),
            seccomp: config.confinement.seccomp,
            free_page_reporting: config.hypervisor.free_page_reporting,
            qemu_run_as: config.hypervisor.qemu_run_as(),
            template_root: match (config.hypervisor.template, backend) {
                (true, Backend::Builtin) => Some(template::template_root()),
                (true, Backend::Qemu) => {
                    tracing::info!(
                        "hypervisor.template is set, but this pod runs under qemu, which has no snapshots: it boots"
                    );
                    None
                }
                (false, _) => None,
            },
        })
    }

    /// The guest kernel command line: built here and nowhere else. The
    /// backends add only their transport's device entries
    /// (`virtio_mmio.device=`), which depend on where they placed devices.
    pub fn kernel_cmdline(&self) -> String {
        format!("{BASE_CMDLINE} {}", self.backend.power_off_parameters())
    }
}

/// A virtio-net device: the TAP it carries frames to and from, and the
/// guest NIC's MAC and MTU.
pub struct NetBackend {
    pub tap: husk_devices::net::Tap,
    pub config: husk_devices::net::NetConfig,
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("tap", &self.tap.name())
            .field("mac", &crate::network::mac_text(&self.config.mac))
            .field("mtu", &self.config.mtu)
            .finish()
    }
}

/// A device given to the VM before it starts.
#[derive(Debug)]
pub enum Device {
    /// virtio-vsock whose host side is the hybrid socket `uds`, holding at
    /// most `max_connections` streams at once.
    Vsock {
        guest_cid: u64,
        uds: PathBuf,
        max_connections: usize,
    },
    /// virtio-fs serving the pod's share.
    SharedFs(FsConfig),
    /// virtio-net carrying the pod's CNI interface through a TAP.
    Net(NetBackend),
}

impl Device {
    /// The device's name in errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Vsock { .. } => "vsock",
            Device::SharedFs(_) => "virtio-fs",
            Device::Net(_) => "virtio-net",
        }
    }
}

/// What a running VM is, for logs, `make bench` and cleanup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub backend: &'static str,
    /// The accelerator and the reason it was chosen.
    pub accelerator: String,
    /// The process the VM runs in (the shim itself for the built-in VMM).
    pub vmm_pid: u32,
}

/// Resolves, with a description of how, when the VM ends by itself.
pub type ExitWatcher = Pin<Box<dyn Future<Output = String> + Send>>;

/// One pod's VM, whatever runs it. Devices are added before `start`;
/// `stop` may be called in any state, more than once.
pub trait Hypervisor: Send {
    /// Adds a device; only before the VM starts.
    fn add_device(&mut self, device: Device) -> Result<(), HypervisorError>;
    /// Starts the VM. Returns once the VMM runs; the agent answers later.
    fn start(&mut self) -> Result<(), HypervisorError>;
    /// What the VM is.
    fn describe(&self) -> VmInfo;
    /// Where the guest agent is reached once it runs.
    fn agent_endpoint(&self) -> Result<Endpoint, HypervisorError>;
    /// A future that resolves when the VM ends on its own.
    fn exit_watcher(&self) -> Result<ExitWatcher, HypervisorError>;
    /// Stops the VM: waits up to `grace` for it to end by itself, then
    /// ends it. Blocking. Returns how it ended, for the log.
    fn stop(&mut self, grace: Duration) -> String;
    /// Called once the agent has answered and before anything of the pod
    /// reached the guest: a VM chosen to become a template is saved now.
    /// Blocking. An error means the VM cannot go on.
    fn after_agent_ready(&mut self) -> Result<(), HypervisorError> {
        Ok(())
    }
    /// Whether the VM was restored from a template, so the agent must be
    /// sent `Restored` before anything else.
    fn restored_from_template(&self) -> bool {
        false
    }
    /// The guest of a VM restored from a template refused it (its
    /// `Restored` failed): the template is set aside so the next pod of
    /// its shape boots instead of failing the same way.
    fn reject_template(&mut self, _why: &str) {}
}

/// The agent endpoint of a VM whose vsock device has its host side at
/// `uds` (`None`: no vsock device was added).
fn hybrid_vsock_endpoint(uds: Option<&Path>) -> Result<Endpoint, HypervisorError> {
    let uds = uds.ok_or(HypervisorError::Device {
        device: "vsock",
        reason: "the VM has no vsock device to reach the agent through".into(),
    })?;
    Ok(Endpoint::HybridVsock {
        uds: uds.to_owned(),
    })
}

/// Makes the VMs of pods.
pub trait Launcher: Send + Sync {
    /// A VM for `spec`, not started.
    fn create(&self, spec: VmSpec) -> Result<Box<dyn Hypervisor>, HypervisorError>;
}

/// The product's launcher: the backend the spec names.
#[derive(Debug, Default, Clone, Copy)]
pub struct BackendLauncher;

impl Launcher for BackendLauncher {
    fn create(&self, spec: VmSpec) -> Result<Box<dyn Hypervisor>, HypervisorError> {
        Ok(match spec.backend {
            Backend::Builtin => Box::new(builtin::BuiltinVm::new(spec)?),
            Backend::Qemu => Box::new(qemu::QemuPodVm::new(spec)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_builtin_only_where_stock_guests_run() {
        let resolve = |kind, host| Backend::resolve(kind, &host).0;
        assert_eq!(
            resolve(HypervisorKind::Auto, HostKvm::Hardware),
            Backend::Builtin
        );
        assert_eq!(resolve(HypervisorKind::Auto, HostKvm::Pvm), Backend::Qemu);
        let unavailable = HostKvm::Unavailable {
            reason: "no /dev/kvm".into(),
        };
        assert_eq!(resolve(HypervisorKind::Auto, unavailable), Backend::Qemu);
        assert_eq!(
            resolve(HypervisorKind::Builtin, HostKvm::Pvm),
            Backend::Builtin
        );
        assert_eq!(
            resolve(HypervisorKind::Qemu, HostKvm::Hardware),
            Backend::Qemu
        );
    }

    #[test]
    fn the_reason_names_the_host_when_auto_decides() {
        let (_, reason) = Backend::resolve(HypervisorKind::Auto, &HostKvm::Pvm);
        assert!(reason.contains("PVM"), "{reason}");
    }

    fn artifacts() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        for (name, slot) in [
            ("vmlinux", &mut config.hypervisor.kernel),
            ("bzImage", &mut config.hypervisor.qemu_kernel),
            ("initrd", &mut config.hypervisor.initrd),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            *slot = path;
        }
        (dir, config)
    }

    const SIZE: VmSize = VmSize {
        vcpus: 2,
        memory_mib: 512,
    };

    #[test]
    fn each_backend_gets_its_kernel_and_its_power_off_parameters() {
        let (dir, config) = artifacts();
        let spec = |backend| {
            VmSpec::for_pod(
                &config,
                None,
                backend,
                SIZE,
                dir.path(),
                &dir.path().join("c"),
            )
            .unwrap()
        };
        let builtin = spec(Backend::Builtin);
        assert_eq!(builtin.kernel, config.hypervisor.kernel);
        assert_eq!(
            builtin.kernel_cmdline(),
            "console=ttyS0 quiet reboot=k panic=1"
        );
        let qemu = spec(Backend::Qemu);
        assert_eq!(qemu.kernel, config.hypervisor.qemu_kernel);
        assert_eq!(
            qemu.kernel_cmdline(),
            "console=ttyS0 quiet reboot=t panic=-1"
        );
        assert_eq!((qemu.vcpus, qemu.memory_mib), (2, 512));
    }

    #[test]
    fn a_missing_kernel_is_refused_naming_the_setting_and_its_source() {
        let (dir, mut config) = artifacts();
        config.hypervisor.qemu_kernel = dir.path().join("missing-bzImage");
        let error = VmSpec::for_pod(
            &config,
            Some(Path::new("/etc/husk/test.toml")),
            Backend::Qemu,
            SIZE,
            dir.path(),
            &dir.path().join("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("hypervisor.qemu_kernel")
                && error.contains("missing-bzImage")
                && error.contains("set in /etc/husk/test.toml"),
            "{error}"
        );
        // The built-in backend does not need the bzImage.
        VmSpec::for_pod(
            &config,
            None,
            Backend::Builtin,
            SIZE,
            dir.path(),
            dir.path(),
        )
        .unwrap();
    }

    #[test]
    fn a_vm_without_a_vsock_device_has_no_agent_endpoint_under_either_backend() {
        let (dir, config) = artifacts();
        for backend in [Backend::Builtin, Backend::Qemu] {
            let spec =
                VmSpec::for_pod(&config, None, backend, SIZE, dir.path(), dir.path()).unwrap();
            let vm = BackendLauncher.create(spec).unwrap();
            let error = vm.agent_endpoint().unwrap_err().to_string();
            assert!(error.contains("no vsock device"), "{backend:?}: {error}");
            assert_eq!(vm.describe().backend, backend.name());
        }
    }

    #[test]
    fn qemu_refuses_more_vcpus_than_it_can_address_naming_the_number() {
        let (dir, config) = artifacts();
        let size = VmSize {
            vcpus: 300,
            memory_mib: 512,
        };
        let spec =
            VmSpec::for_pod(&config, None, Backend::Qemu, size, dir.path(), dir.path()).unwrap();
        let error = BackendLauncher.create(spec).err().unwrap().to_string();
        assert!(error.contains("300 vCPUs"), "{error}");
    }
}
