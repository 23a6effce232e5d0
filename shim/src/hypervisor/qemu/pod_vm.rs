//! A pod's VM in QEMU behind the [`Hypervisor`] seam: the vsock and
//! virtio-fs device models served over vhost-user from threads of this
//! process. Each device's server starts when the device is added, so QEMU
//! finds its socket listening when it starts.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use husk_agent_client::Endpoint;
use husk_devices::fs as virtio_fs;
use husk_devices::vsock::{self as virtio_vsock, VsockConfig};

use super::{QemuVm, QemuVmConfig};
use crate::hypervisor::{
    hybrid_vsock_endpoint, Device, ExitWatcher, Hypervisor, HypervisorError, VmInfo, VmSpec,
};

/// The vhost-user socket of the vsock device, in the work directory.
const VSOCK_VHOST_SOCKET: &str = "vsock-vhost.sock";
/// The vhost-user socket of the virtio-fs device, in the work directory.
const FS_VHOST_SOCKET: &str = "fs-vhost.sock";
/// QEMU's own run directory (QMP socket, output), in the work directory.
const QEMU_DIR: &str = "qemu";
/// The file the QEMU pid is recorded in, for cleanup after a shim crash.
pub const VMM_PID_FILE: &str = "vmm.pid";

/// A pod's VM in QEMU, and the vhost-user servers it uses.
pub struct QemuPodVm {
    spec: VmSpec,
    config: QemuVmConfig,
    vsock_uds: Option<PathBuf>,
    vm: Option<QemuVm>,
    vsock_server: Option<virtio_vsock::VhostUserServer>,
    fs_server: Option<virtio_fs::VhostUserServer>,
}

impl QemuPodVm {
    pub fn new(spec: VmSpec) -> Result<Self, HypervisorError> {
        let vcpus = u8::try_from(spec.vcpus).map_err(|_| HypervisorError::Unsupported {
            backend: "qemu",
            what: format!("{} vCPUs (at most 255)", spec.vcpus),
        })?;
        let memory_mib =
            u32::try_from(spec.memory_mib).map_err(|_| HypervisorError::Unsupported {
                backend: "qemu",
                what: format!("{} MiB of memory", spec.memory_mib),
            })?;
        let mut config = QemuVmConfig::new(&spec.kernel, &spec.initrd, &spec.console_log)
            .with_cmdline(spec.kernel_cmdline())
            .with_vcpus(vcpus)
            .with_memory_mib(memory_mib)
            .with_work_dir(spec.work_dir.join(QEMU_DIR));
        if let Some(binary) = &spec.qemu_binary {
            config = config.with_qemu_binary(binary);
        }
        Ok(Self {
            spec,
            config,
            vsock_uds: None,
            vm: None,
            vsock_server: None,
            fs_server: None,
        })
    }

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

impl Hypervisor for QemuPodVm {
    fn add_device(&mut self, device: Device) -> Result<(), HypervisorError> {
        if self.vm.is_some() {
            return Err(HypervisorError::Device {
                device: device.kind(),
                reason: "QEMU is already running".into(),
            });
        }
        match device {
            Device::Vsock {
                guest_cid,
                uds,
                max_connections,
            } => {
                let socket = self.spec.work_dir.join(VSOCK_VHOST_SOCKET);
                let config = VsockConfig {
                    guest_cid,
                    uds_path: uds.clone(),
                    max_connections,
                };
                let server =
                    virtio_vsock::serve_vhost_user(&socket, config).with_context(|| {
                        format!("cannot serve vhost-user vsock on {}", socket.display())
                    })?;
                self.vsock_server = Some(server);
                self.vsock_uds = Some(uds);
                self.config = self.config.clone().with_vsock(socket);
            }
            Device::SharedFs(fs) => {
                let socket = self.spec.work_dir.join(FS_VHOST_SOCKET);
                let tag = fs.tag.clone();
                let server = virtio_fs::serve_vhost_user(&socket, fs).with_context(|| {
                    format!("cannot serve vhost-user virtio-fs on {}", socket.display())
                })?;
                self.fs_server = Some(server);
                self.config = self.config.clone().with_fs(socket, tag);
            }
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), HypervisorError> {
        let qemu_dir = &self.config.work_dir;
        std::fs::create_dir_all(qemu_dir)
            .with_context(|| format!("cannot create {}", qemu_dir.display()))?;
        let vm = QemuVm::start(self.config.clone()).context("QEMU did not start the pod's VM")?;
        let pid_file = self.spec.work_dir.join(VMM_PID_FILE);
        let recorded = std::fs::write(&pid_file, vm.pid().to_string());
        self.vm = Some(vm);
        recorded.with_context(|| format!("cannot record the VMM pid in {}", pid_file.display()))?;
        Ok(())
    }

    fn describe(&self) -> VmInfo {
        let vm = self.vm.as_ref();
        VmInfo {
            backend: "qemu",
            accelerator: vm
                .map(|vm| format!("{} ({})", vm.accel().accel, vm.accel().reason))
                .unwrap_or_default(),
            vmm_pid: vm.map_or(0, QemuVm::pid),
        }
    }

    fn agent_endpoint(&self) -> Result<Endpoint, HypervisorError> {
        hybrid_vsock_endpoint(self.vsock_uds.as_deref())
    }

    fn exit_watcher(&self) -> Result<ExitWatcher, HypervisorError> {
        let pid = self
            .vm
            .as_ref()
            .map(QemuVm::pid)
            .ok_or_else(|| anyhow::anyhow!("QEMU was not started"))?;
        let fd = pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
        Ok(Box::pin(async move {
            // SAFETY: the AsyncFd owns the pidfd, and closes it only after
            // deregistering it from the reactor.
            match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
                Ok(async_fd) => {
                    let _ = async_fd.readable().await;
                    "the QEMU process exited".to_owned()
                }
                Err(error) => format!("cannot watch the QEMU process: {error}"),
            }
        }))
    }

    fn stop(&mut self, grace: Duration) -> String {
        let end = self.vm.take().map(|vm| {
            if grace.is_zero() {
                vm.stop()
            } else {
                vm.wait_or_stop(grace)
            }
        });
        self.stop_servers();
        match end {
            Some(end) => format!("{end:?}"),
            None => "never started".to_owned(),
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

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
