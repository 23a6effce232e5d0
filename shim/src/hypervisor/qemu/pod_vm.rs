//! A pod's VM in QEMU behind the [`Hypervisor`] seam: the vsock and
//! virtio-fs device models served over vhost-user from threads of this
//! process. Each device's server starts when the device is added, so its
//! socket listens when the backend connects to it on QEMU's behalf. QEMU
//! runs as `spec.qemu_run_as` says.
//!
//! The QEMU pid is recorded in [`VMM_PID_FILE`] (the dead-shim cleanup
//! kills it from there) while the guest is still paused: no guest
//! instruction runs before the pid is on disk.

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
/// The vhost-user socket of the virtio-net device, in the work directory.
const NET_VHOST_SOCKET: &str = "net-vhost.sock";
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
    net_server: Option<husk_devices::net::VhostUserServer>,
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
            .with_console_max_bytes(spec.console_max_bytes)
            .with_work_dir(&spec.work_dir)
            .with_qemu_sandbox(spec.seccomp)
            .with_free_page_reporting(spec.free_page_reporting)
            .with_run_as(spec.qemu_run_as);
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
            net_server: None,
        })
    }

    fn stop_servers(&mut self) {
        if let Some(server) = self.net_server.take() {
            server.stop();
        }
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
            Device::Net(backend) => {
                let socket = self.spec.work_dir.join(NET_VHOST_SOCKET);
                let mac = backend.config.mac;
                let mtu = backend.config.mtu;
                let server =
                    husk_devices::net::serve_vhost_user(&socket, backend.tap, backend.config)
                        .with_context(|| {
                            format!("cannot serve vhost-user virtio-net on {}", socket.display())
                        })?;
                self.net_server = Some(server);
                self.config = self.config.clone().with_net(socket, mac, mtu);
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
        let paused =
            QemuVm::start_paused(self.config.clone()).context("QEMU did not start the pod's VM")?;
        let pid_file = self.spec.work_dir.join(VMM_PID_FILE);
        // On failure the paused VM is dropped: QEMU is killed before the
        // guest ran.
        // Its pid and start time, read while the guest has not run: what
        // a compromised QEMU cannot rewrite (see `recorded_vmm_pid`).
        let record = crate::resources::cleanup::vmm_record(paused.pid())
            .with_context(|| format!("cannot read QEMU's start time (pid {})", paused.pid()))?;
        std::fs::write(&pid_file, record)
            .with_context(|| format!("cannot record the VMM pid in {}", pid_file.display()))?;
        let vm = paused
            .resume()
            .context("QEMU did not resume the pod's paused VM")?;
        self.vm = Some(vm);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use crate::hypervisor::Backend;

    /// What the guest prints once it runs.
    const GUEST_LINE: &str = "guest: hello from the console";

    /// A fake `qemu-system-x86_64` (bash: dash redirects only fds 0-9):
    /// answers `--version`, records its
    /// arguments, pid and uid next to itself, then plays QEMU on the fds it
    /// inherited: greets on QMP, answers every command, records each in
    /// `seen` (`cont` with what the pid file said at that moment, after
    /// which the "guest" prints on the console), and exits on `quit`.
    const FAKE_QEMU: &str = "#!/bin/bash\n\
        case \"$1\" in --version) echo 'QEMU emulator version 7.2.0'; exit 0;; esac\n\
        dir=$(dirname \"$0\")\n\
        printf '%s\\n' \"$@\" > \"$dir/args\"\n\
        echo $$ > \"$dir/qemu.pid\"\n\
        id -u > \"$dir/uid\"\n\
        qmp=$(sed -n 's/^socket,id=qmp,fd=//p' \"$dir/args\")\n\
        console=$(sed -n 's/^socket,id=console,fd=//p' \"$dir/args\")\n\
        echo '{\"QMP\": {\"version\": {}, \"capabilities\": []}}' >&$qmp\n\
        while read -r line <&$qmp; do\n\
          case \"$line\" in\n\
            *'\"cont\"'*) echo \"cont with vmm.pid=$(cat \"$dir/vmm.pid\" 2>/dev/null || echo '<missing>')\" >> \"$dir/seen\"\n\
              echo 'guest: hello from the console' >&$console;;\n\
            *'\"quit\"'*) echo quit >> \"$dir/seen\"; echo '{\"return\": {}}' >&$qmp; exit 0;;\n\
            *) echo \"$line\" | sed 's/.*\"execute\": *\"\\([a-z_]*\\)\".*/\\1/' >> \"$dir/seen\";;\n\
          esac\n\
          echo '{\"return\": {}}' >&$qmp\n\
        done\n";

    /// The commands the fake QEMU saw, in order.
    fn seen(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("seen"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// An id range of its own per test process, far from the default.
    fn test_run_as() -> crate::hypervisor::qemu::RunAs {
        let first = 0x7600_0000 + std::process::id() % 4096 * 16;
        crate::hypervisor::qemu::RunAs::Unprivileged(
            crate::hypervisor::qemu::IdRange::new(first, 16).unwrap(),
        )
    }

    fn spec(dir: &Path) -> VmSpec {
        let qemu = dir.join("qemu-system-x86_64");
        std::fs::write(&qemu, FAKE_QEMU).unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("bzImage"), b"kernel").unwrap();
        std::fs::write(dir.join("initrd"), b"initrd").unwrap();
        // The fake QEMU writes its records here, under its own uid.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        VmSpec {
            backend: Backend::Qemu,
            vcpus: 1,
            memory_mib: 256,
            kernel: dir.join("bzImage"),
            initrd: dir.join("initrd"),
            console_log: dir.join("console.log"),
            console_max_bytes: 64 * 1024,
            work_dir: dir.to_owned(),
            qemu_binary: Some(qemu),
            seccomp: true,
            free_page_reporting: true,
            // Root cannot be left without root; another user keeps its own
            // ids either way.
            qemu_run_as: if crate::testing::is_root() {
                test_run_as()
            } else {
                crate::hypervisor::qemu::RunAs::Root
            },
            template_root: None,
        }
    }

    #[test]
    fn the_guest_is_resumed_only_after_the_pid_file_names_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = QemuPodVm::new(spec(dir.path())).unwrap();
        vm.start().unwrap();
        let pid = vm.describe().vmm_pid;
        // The record is the pid and its start time, read while QEMU lives.
        let record = crate::resources::cleanup::vmm_record(pid).unwrap();
        assert!(record.starts_with(&format!("{pid} ")), "{record}");
        vm.stop(Duration::ZERO);
        assert_eq!(
            seen(dir.path()),
            [
                "qmp_capabilities".to_owned(),
                format!("cont with {VMM_PID_FILE}={record}"),
                "quit".to_owned()
            ]
        );
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert!(args.lines().any(|arg| arg == "-S"), "{args}");
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
        assert_eq!(console, format!("{GUEST_LINE}\n"));
    }

    #[test]
    fn qemu_runs_as_a_uid_of_the_configured_range() {
        if !crate::testing::is_root() {
            println!("husk-test-form: qemu pod vm uid: not run: changing ids needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let crate::hypervisor::qemu::RunAs::Unprivileged(range) = spec.qemu_run_as else {
            unreachable!("root's tests run QEMU unprivileged");
        };
        let mut vm = QemuPodVm::new(spec).unwrap();
        vm.start().unwrap();
        let uid: u32 = std::fs::read_to_string(dir.path().join("uid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pid = vm.describe().vmm_pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        vm.stop(Duration::ZERO);
        assert!(
            uid >= range.first() && uid < range.first() + range.count(),
            "QEMU ran as {uid}, outside {range:?}"
        );
        let gids = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
        assert!(
            gids.split_whitespace()
                .skip(1)
                .all(|gid| gid == uid.to_string()),
            "{gids}"
        );
        let caps = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        assert!(caps.ends_with("0000000000000000"), "{caps}");
    }

    #[test]
    fn a_pid_that_cannot_be_recorded_kills_qemu_before_the_guest_runs() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the pid file goes: the write fails.
        std::fs::create_dir(dir.path().join(VMM_PID_FILE)).unwrap();
        let mut vm = QemuPodVm::new(spec(dir.path())).unwrap();
        let error = format!("{:#}", vm.start().unwrap_err());
        assert!(error.contains(VMM_PID_FILE), "{error}");
        // QEMU was killed and reaped before `start` returned.
        let qemu_pid = std::fs::read_to_string(dir.path().join("qemu.pid")).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", qemu_pid.trim())).exists(),
            "QEMU {qemu_pid} is still there"
        );
        assert_eq!(seen(dir.path()), ["qmp_capabilities"]);
        assert_eq!(vm.describe().vmm_pid, 0);
    }
}
