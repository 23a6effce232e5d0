//! What one QEMU guest is made of: kernel, initrd, command line, vCPUs,
//! memory, the vhost-user devices, where the console goes and how much of
//! it is kept, the accelerator, who QEMU runs as
//! and where the VM keeps its run directory. A builder: start from
//! [`QemuVmConfig::new`] and chain the `with_*` methods.

use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::identity::RunAs;
use crate::hypervisor::console::DEFAULT_CONSOLE_MAX_BYTES;

/// The kernel command line every QEMU guest starts with; the caller's
/// parameters are appended. `reboot=t` resets through a triple fault, which
/// `microvm` (no i8042, no ACPI) always honours, and `-no-reboot` turns the
/// reset into QEMU's exit; `panic=-1` makes a panicking kernel reset at once
/// instead of hanging until the caller's deadline.
pub const DEFAULT_QEMU_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

/// Guest memory unless configured otherwise.
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// The hybrid vsock device, served over vhost-user by this process.
///
/// It carries no guest CID: QEMU 7.2's `vhost-user-vsock-device` has no
/// `guest-cid` property and reads the CID from the backend's configuration
/// space, so the vsock server's own configuration decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserVsock {
    /// The vhost-user socket the device's server listens on.
    pub socket: PathBuf,
}

/// The virtio-fs device, served over vhost-user by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserFs {
    /// The vhost-user socket the device's server listens on.
    pub socket: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
}

/// The virtio-net device, served over vhost-user by this process
/// (`-netdev vhost-user` and `virtio-net-device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserNet {
    /// The vhost-user socket the device's server listens on.
    pub socket: PathBuf,
    /// The guest NIC's MAC (QEMU's virtio-net keeps the config space).
    pub mac: [u8; 6],
    /// The MTU the device announces (`host_mtu`).
    pub mtu: u16,
}

/// Everything [`super::QemuVm::start`] needs.
#[derive(Debug, Clone)]
pub struct QemuVmConfig {
    /// The QEMU binary; `None` looks up `qemu-system-x86_64` on `PATH`.
    pub qemu_binary: Option<PathBuf>,
    /// The guest kernel, a bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The full kernel command line (starts as [`DEFAULT_QEMU_CMDLINE`]).
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub vsock: Option<VhostUserVsock>,
    pub fs: Option<VhostUserFs>,
    pub net: Option<VhostUserNet>,
    /// The file the guest's serial console is written to (truncated at
    /// start), rotated into `<console_log>.1` at `console_max_bytes`.
    pub console_log: PathBuf,
    /// The cap of each of the console's two files.
    pub console_max_bytes: u64,
    pub accel: Accel,
    /// Where the VM's run directory is created (default: the system's
    /// temporary directory). The run directory is removed when the VM ends.
    pub work_dir: PathBuf,
    /// QEMU's own seccomp sandbox (`-sandbox on,…`, see `command.rs`).
    pub qemu_sandbox: bool,
    /// A virtio-balloon whose free page reporting returns the pages the
    /// guest frees to the host (see `command.rs`).
    pub free_page_reporting: bool,
    /// Who QEMU runs as (default: a uid of its own from the default
    /// range, see `identity.rs`). The work directory names the VM when a
    /// uid is chosen.
    pub run_as: RunAs,
}

impl QemuVmConfig {
    /// A one-vCPU, [`DEFAULT_MEMORY_MIB`] guest without devices, writing its
    /// console to `console_log` (at most [`DEFAULT_CONSOLE_MAX_BYTES`] there
    /// and as much in `<console_log>.1`).
    pub fn new(
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        console_log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            qemu_binary: None,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: DEFAULT_QEMU_CMDLINE.to_owned(),
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            vsock: None,
            fs: None,
            net: None,
            console_log: console_log.into(),
            console_max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            accel: Accel::Auto,
            work_dir: std::env::temp_dir(),
            qemu_sandbox: true,
            free_page_reporting: false,
            run_as: RunAs::default(),
        }
    }

    /// Runs QEMU as `run_as` (`hypervisor.qemu_run_as`).
    pub fn with_run_as(mut self, run_as: RunAs) -> Self {
        self.run_as = run_as;
        self
    }

    /// Turns QEMU's own seccomp sandbox on or off (`confinement.seccomp`).
    pub fn with_qemu_sandbox(mut self, on: bool) -> Self {
        self.qemu_sandbox = on;
        self
    }

    /// Gives the guest a virtio-balloon with free page reporting, or not
    /// (`hypervisor.free_page_reporting`).
    pub fn with_free_page_reporting(mut self, on: bool) -> Self {
        self.free_page_reporting = on;
        self
    }

    pub fn with_qemu_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.qemu_binary = Some(binary.into());
        self
    }

    /// Appends parameters to the kernel command line.
    pub fn append_cmdline(mut self, parameters: &str) -> Self {
        let parameters = parameters.trim();
        if !parameters.is_empty() {
            if !self.cmdline.is_empty() {
                self.cmdline.push(' ');
            }
            self.cmdline.push_str(parameters);
        }
        self
    }

    /// Replaces the whole kernel command line, defaults included.
    pub fn with_cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    pub fn with_vcpus(mut self, vcpus: u8) -> Self {
        self.vcpus = vcpus;
        self
    }

    pub fn with_memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    pub fn with_vsock(mut self, socket: impl Into<PathBuf>) -> Self {
        self.vsock = Some(VhostUserVsock {
            socket: socket.into(),
        });
        self
    }

    pub fn with_fs(mut self, socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        self.fs = Some(VhostUserFs {
            socket: socket.into(),
            tag: tag.into(),
        });
        self
    }

    /// A virtio-net device served on `socket`, its guest NIC `mac` with `mtu`.
    pub fn with_net(mut self, socket: impl Into<PathBuf>, mac: [u8; 6], mtu: u16) -> Self {
        self.net = Some(VhostUserNet {
            socket: socket.into(),
            mac,
            mtu,
        });
        self
    }

    /// Caps each of the console's two files at `max_bytes`.
    pub fn with_console_max_bytes(mut self, max_bytes: u64) -> Self {
        self.console_max_bytes = max_bytes;
        self
    }

    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    pub fn with_work_dir(mut self, work_dir: impl Into<PathBuf>) -> Self {
        self.work_dir = work_dir.into();
        self
    }

    /// The console log path.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_parameters_follow_the_defaults() {
        let config = QemuVmConfig::new("k", "i", "c").append_cmdline(" quiet husk.exec=/test/run ");
        assert_eq!(
            config.cmdline,
            "console=ttyS0 reboot=t panic=-1 quiet husk.exec=/test/run"
        );
        assert_eq!(
            config.append_cmdline("").cmdline.matches("quiet").count(),
            1
        );
    }

    #[test]
    fn replaced_command_line_drops_the_defaults() {
        let config = QemuVmConfig::new("k", "i", "c")
            .with_cmdline("")
            .append_cmdline("console=hvc0");
        assert_eq!(config.cmdline, "console=hvc0");
    }
}
