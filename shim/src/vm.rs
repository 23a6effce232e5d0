//! The pod's virtual machine, behind one interface for both backends:
//!
//! - `builtin`: the VMM inside this process (`husk_vmm::VmBuilder`), with
//!   the vsock and virtio-fs devices on virtio-mmio;
//! - `qemu`: `qemu-system-x86_64 -M microvm` (`husk_vmm::qemu`), with the
//!   same device models served over vhost-user from threads of this
//!   process.
//!
//! Either way the guest's vsock appears on the host as the hybrid socket
//! [`SandboxPaths::vsock_uds`] and the share as [`SandboxPaths::share`].

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use husk_devices::fs::{self as virtio_fs, CachePolicy, FsConfig, VirtioFs};
use husk_devices::vsock::{self as virtio_vsock, VsockConfig, VsockDevice};
use husk_vmm::qemu::{QemuVm, QemuVmConfig};
use husk_vmm::{MicroVm, SerialSink, VmBuilder, VmExit};

use crate::config::{Config, HypervisorKind, VmSize};
use crate::paths::SandboxPaths;

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;
/// The virtio-fs tag of the share (the name Kata uses too).
pub const SHARED_FS_TAG: &str = "kataShared";

/// A running VM of either backend.
pub enum PodVm {
    Builtin(BuiltinVm),
    Qemu(Box<QemuPodVm>),
}

/// The built-in VMM's VM; the devices live inside it.
pub struct BuiltinVm {
    vm: Arc<Mutex<MicroVm>>,
}

/// A QEMU process and the vhost-user servers it uses.
pub struct QemuPodVm {
    vm: Option<QemuVm>,
    vsock_server: Option<virtio_vsock::VhostUserServer>,
    fs_server: Option<virtio_fs::VhostUserServer>,
}

/// What the VM is, for logs and `make bench`.
#[derive(Debug, Clone)]
pub struct VmDescription {
    pub backend: &'static str,
    pub accelerator: String,
    pub vmm_pid: u32,
}

fn fs_config(paths: &SandboxPaths, config: &Config) -> Result<FsConfig> {
    let mut fs = FsConfig::new(paths.share());
    fs.tag = SHARED_FS_TAG.to_owned();
    fs.cache = parse_cache(&config.shared_fs.cache)?;
    fs.xattr = config.shared_fs.xattr;
    Ok(fs)
}

fn parse_cache(name: &str) -> Result<CachePolicy> {
    [
        CachePolicy::Never,
        CachePolicy::Metadata,
        CachePolicy::Auto,
        CachePolicy::Always,
    ]
    .into_iter()
    .find(|policy| policy.as_str() == name)
    .ok_or_else(|| anyhow!("shared_fs.cache = {name:?} is not a virtio-fs cache policy"))
}

impl PodVm {
    /// Starts the VM. Returns once the VMM runs; the agent answers later.
    pub fn start(
        kind: HypervisorKind,
        config: &Config,
        size: VmSize,
        paths: &SandboxPaths,
    ) -> Result<Self> {
        match kind {
            HypervisorKind::Builtin => Self::start_builtin(config, size, paths),
            HypervisorKind::Qemu => Self::start_qemu(config, size, paths),
            HypervisorKind::Auto => Err(anyhow!("the hypervisor choice was not resolved")),
        }
    }

    fn start_builtin(config: &Config, size: VmSize, paths: &SandboxPaths) -> Result<Self> {
        let vsock = VsockDevice::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: paths.vsock_uds(),
        })
        .context("cannot create the vsock device")?;
        let fs = VirtioFs::new(fs_config(paths, config)?)
            .context("cannot create the virtio-fs device")?;
        let console = File::create(paths.console_log()).with_context(|| {
            format!(
                "cannot create the console log {}",
                paths.console_log().display()
            )
        })?;
        let mut vm = VmBuilder::new()
            .vcpus(size.vcpus)
            .memory_mib(size.memory_mib)
            .linux(
                &config.hypervisor.kernel,
                Some(config.hypervisor.initrd.clone()),
                "console=ttyS0 reboot=k panic=1 quiet",
            )
            .virtio_device(Box::new(vsock))
            .virtio_device(Box::new(fs))
            .serial(SerialSink::Writer(Box::new(console)))
            .build()
            .with_context(|| {
                format!(
                    "the built-in VMM cannot build the VM (kernel {})",
                    config.hypervisor.kernel.display()
                )
            })?;
        vm.start()
            .context("the built-in VMM cannot start the vCPUs")?;
        Ok(PodVm::Builtin(BuiltinVm {
            vm: Arc::new(Mutex::new(vm)),
        }))
    }

    fn start_qemu(config: &Config, size: VmSize, paths: &SandboxPaths) -> Result<Self> {
        let vcpus = u8::try_from(size.vcpus)
            .map_err(|_| anyhow!("qemu backend: {} vCPUs is more than 255", size.vcpus))?;
        let memory_mib = u32::try_from(size.memory_mib)
            .map_err(|_| anyhow!("qemu backend: {} MiB is too much memory", size.memory_mib))?;
        let mut pod = QemuPodVm {
            vm: None,
            vsock_server: None,
            fs_server: None,
        };
        pod.vsock_server = Some(
            virtio_vsock::serve_vhost_user(
                &paths.vsock_vhost(),
                VsockConfig {
                    guest_cid: GUEST_CID,
                    uds_path: paths.vsock_uds(),
                },
            )
            .with_context(|| {
                format!(
                    "cannot serve vhost-user vsock on {}",
                    paths.vsock_vhost().display()
                )
            })?,
        );
        pod.fs_server = Some(
            virtio_fs::serve_vhost_user(&paths.fs_vhost(), fs_config(paths, config)?)
                .with_context(|| {
                    format!(
                        "cannot serve vhost-user virtio-fs on {}",
                        paths.fs_vhost().display()
                    )
                })?,
        );
        std::fs::create_dir_all(paths.qemu_dir())
            .with_context(|| format!("cannot create {}", paths.qemu_dir().display()))?;
        let mut qemu = QemuVmConfig::new(
            &config.hypervisor.qemu_kernel,
            &config.hypervisor.initrd,
            paths.console_log(),
        )
        .with_vcpus(vcpus)
        .with_memory_mib(memory_mib)
        .with_vsock(paths.vsock_vhost())
        .with_fs(paths.fs_vhost(), SHARED_FS_TAG)
        .with_work_dir(paths.qemu_dir())
        .append_cmdline("quiet");
        if let Some(binary) = &config.hypervisor.qemu_binary {
            qemu = qemu.with_qemu_binary(binary);
        }
        let vm = QemuVm::start(qemu).context("QEMU did not start the pod's VM")?;
        std::fs::write(paths.vmm_pid_file(), vm.pid().to_string()).with_context(|| {
            format!(
                "cannot record the VMM pid in {}",
                paths.vmm_pid_file().display()
            )
        })?;
        pod.vm = Some(vm);
        Ok(PodVm::Qemu(Box::new(pod)))
    }

    pub fn describe(&self) -> VmDescription {
        match self {
            PodVm::Builtin(_) => VmDescription {
                backend: "builtin",
                accelerator: "kvm".to_owned(),
                vmm_pid: std::process::id(),
            },
            PodVm::Qemu(pod) => {
                let vm = pod.vm.as_ref();
                VmDescription {
                    backend: "qemu",
                    accelerator: vm
                        .map(|vm| format!("{} ({})", vm.accel().accel, vm.accel().reason))
                        .unwrap_or_default(),
                    vmm_pid: vm.map_or(0, QemuVm::pid),
                }
            }
        }
    }

    /// A future-free watcher: resolves (on a blocking thread for the
    /// built-in VMM, through a pidfd for QEMU) when the VM ended by itself.
    pub fn exit_watcher(&self) -> Result<ExitWatcher> {
        match self {
            PodVm::Builtin(builtin) => Ok(ExitWatcher::Builtin(builtin.vm.clone())),
            PodVm::Qemu(pod) => {
                let pid = pod.vm.as_ref().map_or(0, QemuVm::pid);
                let fd = pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
                Ok(ExitWatcher::Pidfd(fd))
            }
        }
    }

    /// Stops the VM (it may already have ended) and its device servers;
    /// returns how it ended, for the log.
    pub fn stop(self, grace: Duration) -> String {
        match self {
            PodVm::Builtin(builtin) => {
                let mut vm = builtin.vm.lock().unwrap_or_else(|p| p.into_inner());
                let exit = match vm.wait(Some(grace)) {
                    Ok(Some(exit)) => exit,
                    _ => vm.stop(),
                };
                format!("{exit:?}")
            }
            PodVm::Qemu(mut pod) => {
                let end = pod.vm.take().map(|vm| {
                    if grace.is_zero() {
                        vm.stop()
                    } else {
                        vm.wait_or_stop(grace)
                    }
                });
                pod.stop_servers();
                format!("{end:?}")
            }
        }
    }
}

impl QemuPodVm {
    fn stop_servers(&mut self) {
        if let Some(server) = self.vsock_server.take() {
            server.stop();
        }
        if let Some(server) = self.fs_server.take() {
            if let Err(error) = server.stop() {
                tracing::warn!(%error, "the virtio-fs server had failed");
            }
        }
    }
}

impl Drop for QemuPodVm {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
        self.stop_servers();
    }
}

/// Resolves when the VM ends on its own.
pub enum ExitWatcher {
    Builtin(Arc<Mutex<MicroVm>>),
    Pidfd(OwnedFd),
}

impl ExitWatcher {
    /// Waits for the end of the VM; returns a description of it.
    pub async fn ended(self) -> String {
        match self {
            ExitWatcher::Builtin(vm) => tokio::task::spawn_blocking(move || loop {
                let exit: Option<VmExit> = {
                    let vm = vm.lock().unwrap_or_else(|p| p.into_inner());
                    match vm.wait(Some(Duration::from_millis(200))) {
                        Ok(exit) => exit,
                        Err(error) => return format!("the built-in VMM failed: {error}"),
                    }
                };
                if let Some(exit) = exit {
                    return format!("the built-in VM ended: {exit:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            })
            .await
            .unwrap_or_else(|error| format!("the VM watcher failed: {error}")),
            ExitWatcher::Pidfd(fd) => {
                // SAFETY: the pidfd is owned by the AsyncFd, which closes it
                // only after deregistering it.
                match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
                    Ok(async_fd) => {
                        let _ = async_fd.readable().await;
                        "the QEMU process exited".to_owned()
                    }
                    Err(error) => format!("cannot watch the QEMU process: {error}"),
                }
            }
        }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
