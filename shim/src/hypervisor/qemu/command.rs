//! The QEMU command line for one guest, assembled from a [`QemuVmConfig`].
//!
//! The machine is `microvm` without ACPI (QEMU then lists the virtio-mmio
//! devices on the kernel command line), its memory a shared memfd so that
//! vhost-user servers can map it, no default devices, and `-no-reboot` so a
//! guest reset ends QEMU. The virtio-mmio transports speak virtio 1.x (MMIO
//! version 2) instead of microvm's legacy default. QEMU starts with its
//! vCPUs stopped (`-S`): the guest runs only once the backend recorded the
//! QEMU pid and sent QMP `cont`.
//!
//! QEMU opens one path of the VM directory at most: every other socket it
//! uses reaches it as an inherited fd (`-chardev socket,id=..,fd=N`,
//! [`QemuFds`]). The console and QMP are socket pairs whose other ends the
//! backend keeps; the vsock and virtio-fs devices get a connection the
//! backend made to the device's server on QEMU's behalf. QEMU 7.2's
//! `-netdev vhost-user` refuses a chardev made from an fd ("does not
//! support FD passing": only a socket it connected by path passes fds), so
//! the net device's socket is named by path, and the backend lets QEMU's
//! uid reach that one socket (see `vm.rs`). So QEMU can run as a user that
//! cannot list or enter anything else of the pod's 0700 VM directory. The VM directory still appears on the
//! command line, as the guest's `-name`, which QEMU never opens: it tells
//! an operator (and the dead-shim cleanup, which checks a recorded pid
//! against it) whose VM this QEMU is. Values embedded in option strings
//! have their commas doubled, QEMU's escape.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use super::accel::ResolvedAccel;
use super::config::QemuVmConfig;
use super::error::QemuError;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The virtio-fs tag field is 36 bytes (virtio 1.2, 5.11.4).
pub const MAX_FS_TAG_BYTES: usize = 36;

/// The chardev ids the command line uses.
const CONSOLE_CHARDEV: &str = "console";
const QMP_CHARDEV: &str = "qmp";
const VSOCK_CHARDEV: &str = "vsock";
const FS_CHARDEV: &str = "fs";
const NET_CHARDEV: &str = "net";
/// The `-netdev` id of the pod's NIC.
const NET_NETDEV: &str = "pod0";

/// The fds QEMU inherits for its sockets, by the number they keep in QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuFds {
    /// QEMU's end of the QMP socket pair.
    pub qmp: RawFd,
    /// QEMU's end of the serial console's socket pair.
    pub console: RawFd,
    /// A connection to the vsock device's vhost-user server, if the
    /// configuration has the device.
    pub vsock: Option<RawFd>,
    /// A connection to the virtio-fs device's server, likewise.
    pub fs: Option<RawFd>,
}

impl QemuFds {
    /// Every fd QEMU must inherit.
    pub fn all(&self) -> Vec<RawFd> {
        [Some(self.qmp), Some(self.console), self.vsock, self.fs]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The virtio-balloon device QEMU gives a guest for free page reporting.
pub const FREE_PAGE_REPORTING_DEVICE: &str = "virtio-balloon-device,free-page-reporting=on";

/// QEMU's `-sandbox` option: every denial it offers.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The arguments (without the program) that start `config`'s guest with
/// `accel`, paused, its QMP monitor, console and devices on `fds`.
pub fn qemu_arguments(
    config: &QemuVmConfig,
    accel: ResolvedAccel,
    fds: &QemuFds,
) -> Result<Vec<OsString>, QemuError> {
    validate(config, fds)?;
    let memory = format!("{}M", config.memory_mib);
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<OsStr>]| {
        args.extend(items.iter().map(|item| item.as_ref().to_os_string()));
    };

    push(&[
        &"-no-user-config",
        &"-nodefaults",
        &"-no-reboot",
        &"-nographic",
    ]);
    // Paused until QMP `cont`: nothing of the guest runs before the backend
    // recorded the QEMU pid.
    push(&[&"-S"]);
    // A label only: QEMU never opens it.
    let mut name = OsString::from("guest=");
    name.push(escape_option_value(config.work_dir.as_os_str()));
    push(&[&"-name", &name]);
    if config.qemu_sandbox {
        // QEMU's seccomp filter: no obsolete calls, no set*id, no fork or
        // exec, no scheduler or resource-limit changes once it runs.
        push(&[&"-sandbox", &QEMU_SANDBOX]);
    }
    push(&[&"-M", &"microvm,acpi=off,memory-backend=mem"]);
    // microvm's virtio-mmio transports default to the legacy (version 1)
    // interface; the device models, like the built-in VMM, speak virtio 1.x
    // over MMIO version 2.
    push(&[&"-global", &"virtio-mmio.force-legacy=false"]);
    push(&[&"-accel", &accel.qemu_option(), &"-cpu", &accel.cpu_model()]);
    push(&[&"-smp", &config.vcpus.to_string()]);
    push(&[&"-m", &memory]);
    push(&[
        &"-object",
        &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
    ]);
    push(&[&"-kernel", &config.kernel, &"-initrd", &config.initrd]);
    let cmdline = match accel.guest_kernel_parameters() {
        "" => config.cmdline.clone(),
        extra => format!("{} {extra}", config.cmdline),
    };
    push(&[&"-append", &cmdline]);

    if config.free_page_reporting {
        // The guest reports the free pages it gathers (in 2 MiB blocks by
        // default) and QEMU discards them from the memfd, so memory the
        // guest used once and freed (the unpacked initramfs, exited
        // containers, page cache it dropped) stops costing the host. The
        // balloon is never inflated.
        push(&[&"-device", &FREE_PAGE_REPORTING_DEVICE]);
    }

    // Connected sockets: QEMU has nothing to connect or listen to, and
    // without `reconnect` a closed connection stays closed.
    push(&[&"-chardev", &chardev(CONSOLE_CHARDEV, fds.console)]);
    push(&[&"-serial", &format!("chardev:{CONSOLE_CHARDEV}")]);
    push(&[&"-chardev", &chardev(QMP_CHARDEV, fds.qmp)]);
    push(&[&"-mon", &format!("chardev={QMP_CHARDEV},mode=control")]);

    if let (Some(_), Some(fd)) = (&config.vsock, fds.vsock) {
        push(&[&"-chardev", &chardev(VSOCK_CHARDEV, fd)]);
        push(&[
            &"-device",
            &format!("vhost-user-vsock-device,chardev={VSOCK_CHARDEV}"),
        ]);
    }
    if let (Some(fs), Some(fd)) = (&config.fs, fds.fs) {
        push(&[&"-chardev", &chardev(FS_CHARDEV, fd)]);
        let mut device = OsString::from(format!("vhost-user-fs-device,chardev={FS_CHARDEV},tag="));
        device.push(escape_option_value(OsStr::new(&fs.tag)));
        push(&[&"-device", &device]);
    }
    if let Some(net) = &config.net {
        let mut chardev = OsString::from(format!("socket,id={NET_CHARDEV},path="));
        chardev.push(escape_option_value(net.socket.as_os_str()));
        push(&[&"-chardev", &chardev]);
        push(&[
            &"-netdev",
            &format!("vhost-user,id={NET_NETDEV},chardev={NET_CHARDEV}"),
        ]);
        push(&[
            &"-device",
            &format!(
                "virtio-net-device,netdev={NET_NETDEV},mac={},host_mtu={}",
                crate::network::mac_text(&net.mac),
                net.mtu
            ),
        ]);
    }
    Ok(args)
}

/// `-chardev socket,id=<id>,fd=<fd>`: a socket QEMU inherited, already
/// connected.
fn chardev(id: &str, fd: RawFd) -> String {
    format!("socket,id={id},fd={fd}")
}

/// Doubles every comma: QEMU's option syntax reads `,,` as a literal comma.
pub fn escape_option_value(value: &OsStr) -> OsString {
    let mut escaped = Vec::with_capacity(value.len());
    for &byte in value.as_bytes() {
        escaped.push(byte);
        if byte == b',' {
            escaped.push(b',');
        }
    }
    OsString::from_vec(escaped)
}

/// Rejects values QEMU or the guest would fail on later, with less clear
/// messages.
fn validate(config: &QemuVmConfig, fds: &QemuFds) -> Result<(), QemuError> {
    if config.vcpus == 0 {
        return Err(QemuError::InvalidOption {
            option: "vcpus",
            reason: "a guest needs at least one vCPU".to_owned(),
        });
    }
    // Below this the 6.12 guest kernel with its initramfs does not boot.
    const MIN_MEMORY_MIB: u32 = 64;
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(QemuError::InvalidOption {
            option: "memory_mib",
            reason: format!(
                "{} MiB is below the {MIN_MEMORY_MIB} MiB a guest needs",
                config.memory_mib
            ),
        });
    }
    if config.cmdline.contains(['\n', '\0']) {
        return Err(QemuError::InvalidOption {
            option: "cmdline",
            reason: "the kernel command line is one line without NUL bytes".to_owned(),
        });
    }
    for (device, configured, fd) in [
        ("vsock", config.vsock.is_some(), fds.vsock),
        ("fs", config.fs.is_some(), fds.fs),
    ] {
        if configured != fd.is_some() {
            return Err(QemuError::InvalidOption {
                option: device,
                reason: format!(
                    "the device is {}configured but {} connection fd was given",
                    if configured { "" } else { "not " },
                    if fd.is_some() { "a" } else { "no" }
                ),
            });
        }
    }
    if let Some(vsock) = &config.vsock {
        check_socket_path(&vsock.socket)?;
    }
    if let Some(net) = &config.net {
        check_socket_path(&net.socket)?;
    }
    if let Some(fs) = &config.fs {
        check_socket_path(&fs.socket)?;
        if fs.tag.is_empty() || fs.tag.len() > MAX_FS_TAG_BYTES {
            return Err(QemuError::InvalidOption {
                option: "fs.tag",
                reason: format!("{:?} must be 1 to {MAX_FS_TAG_BYTES} bytes", fs.tag),
            });
        }
    }
    Ok(())
}

fn check_socket_path(path: &Path) -> Result<(), QemuError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        return Err(QemuError::SocketPathTooLong {
            path: path.to_path_buf(),
            max: MAX_SOCKET_PATH_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuVmConfig {
        QemuVmConfig::new("/k/bzImage", "/k/initrd.gz", "/logs/console.log")
            .with_work_dir("/run/husk/vm/0123456789abcdef")
    }

    /// Fds for `config`'s devices: 10 and 11 for QMP and console, 12 to
    /// 13 for vsock and fs when configured.
    fn fds(config: &QemuVmConfig) -> QemuFds {
        QemuFds {
            qmp: 10,
            console: 11,
            vsock: config.vsock.as_ref().map(|_| 12),
            fs: config.fs.as_ref().map(|_| 13),
        }
    }

    fn args_of(config: &QemuVmConfig, accel: ResolvedAccel) -> Vec<String> {
        qemu_arguments(config, accel, &fds(config))
            .unwrap()
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect()
    }

    /// The values following each occurrence of `flag`.
    fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    /// The value following `flag`, for flags that occur once.
    fn value_of<'a>(args: &'a [String], flag: &str) -> &'a str {
        match values_of(args, flag).as_slice() {
            [value] => value,
            values => panic!("{flag} has the values {values:?} in {args:?}"),
        }
    }

    #[test]
    fn guest_memory_is_a_shared_memfd_backing_microvm() {
        let args = args_of(&config().with_memory_mib(512), ResolvedAccel::Tcg);
        assert_eq!(value_of(&args, "-M"), "microvm,acpi=off,memory-backend=mem");
        assert_eq!(value_of(&args, "-global"), "virtio-mmio.force-legacy=false");
        assert_eq!(value_of(&args, "-m"), "512M");
        assert_eq!(
            value_of(&args, "-object"),
            "memory-backend-memfd,id=mem,size=512M,share=on"
        );
    }

    #[test]
    fn tcg_runs_the_max_cpu_and_kvm_the_host_cpu() {
        let tcg = args_of(&config(), ResolvedAccel::Tcg);
        assert_eq!(value_of(&tcg, "-accel"), "tcg,tb-size=32");
        assert_eq!(value_of(&tcg, "-cpu"), "max");
        let kvm = args_of(&config(), ResolvedAccel::Kvm);
        assert_eq!(value_of(&kvm, "-accel"), "kvm");
        assert_eq!(value_of(&kvm, "-cpu"), "host");
    }

    #[test]
    fn qemu_runs_under_its_own_seccomp_sandbox_unless_turned_off() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        assert_eq!(
            value_of(&args, "-sandbox"),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
        let args = args_of(&config().with_qemu_sandbox(false), ResolvedAccel::Tcg);
        assert!(!args.iter().any(|arg| arg == "-sandbox"), "{args:?}");
    }

    #[test]
    fn no_default_devices_and_a_guest_reset_ends_qemu() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        for flag in ["-nodefaults", "-no-reboot", "-nographic", "-no-user-config"] {
            assert!(
                args.iter().any(|arg| arg == flag),
                "{flag} missing from {args:?}"
            );
        }
    }

    #[test]
    fn kernel_initrd_vcpus_and_command_line_are_passed() {
        let config = config()
            .with_vcpus(2)
            .append_cmdline("quiet husk.exec=/test/run");
        let args = args_of(&config, ResolvedAccel::Tcg);
        assert_eq!(value_of(&args, "-kernel"), "/k/bzImage");
        assert_eq!(value_of(&args, "-initrd"), "/k/initrd.gz");
        assert_eq!(value_of(&args, "-smp"), "2");
        assert_eq!(
            value_of(&args, "-append"),
            "console=ttyS0 reboot=t panic=-1 quiet husk.exec=/test/run noapictimer"
        );
        // Only TCG's emulated APIC timer calibration is skipped.
        let args = args_of(&config, ResolvedAccel::Kvm);
        assert_eq!(
            value_of(&args, "-append"),
            "console=ttyS0 reboot=t panic=-1 quiet husk.exec=/test/run"
        );
    }

    #[test]
    fn free_page_reporting_adds_the_balloon_only_when_asked() {
        let devices = |config: &QemuVmConfig| {
            values_of(&args_of(config, ResolvedAccel::Tcg), "-device")
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert!(!devices(&config())
            .iter()
            .any(|d| d.starts_with("virtio-balloon")));
        let with = devices(&config().with_free_page_reporting(true));
        assert!(
            with.iter().any(|d| d == FREE_PAGE_REPORTING_DEVICE),
            "{with:?}"
        );
    }

    #[test]
    fn qemu_starts_paused() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        assert_eq!(
            args.iter().filter(|arg| *arg == "-S").count(),
            1,
            "{args:?}"
        );
    }

    #[test]
    fn console_and_qmp_are_inherited_socket_fds_not_paths() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        let chardevs = values_of(&args, "-chardev");
        assert_eq!(
            chardevs,
            ["socket,id=console,fd=11", "socket,id=qmp,fd=10"],
            "{args:?}"
        );
        // Nothing QEMU would open or bind: no path=, no server socket, and
        // the console log file is not QEMU's to write.
        for arg in &args {
            assert!(
                !arg.contains("path=") && !arg.contains("server=") && !arg.contains("console.log"),
                "{arg} in {args:?}"
            );
        }
        assert_eq!(value_of(&args, "-serial"), "chardev:console");
        assert_eq!(value_of(&args, "-mon"), "chardev=qmp,mode=control");
    }

    #[test]
    fn the_vm_directory_appears_only_as_the_guests_name() {
        let config = config()
            .with_vsock("/run/husk/vm/0123456789abcdef/vsock.sock")
            .with_fs("/run/husk/vm/0123456789abcdef/fs.sock", "kataShared");
        let args = args_of(&config, ResolvedAccel::Tcg);
        assert_eq!(
            value_of(&args, "-name"),
            "guest=/run/husk/vm/0123456789abcdef"
        );
        let naming: Vec<&String> = args
            .iter()
            .filter(|arg| arg.contains("/run/husk/vm"))
            .collect();
        assert_eq!(naming, ["guest=/run/husk/vm/0123456789abcdef"], "{args:?}");
    }

    #[test]
    fn a_device_without_its_fd_or_an_fd_without_its_device_is_refused() {
        let with_vsock = config().with_vsock("/run/vsock.sock");
        let error = qemu_arguments(&with_vsock, ResolvedAccel::Tcg, &fds(&config())).unwrap_err();
        assert!(error.to_string().contains("vsock"), "{error}");
        let error = qemu_arguments(&config(), ResolvedAccel::Tcg, &fds(&with_vsock)).unwrap_err();
        assert!(error.to_string().contains("vsock"), "{error}");
    }

    #[test]
    fn without_devices_there_is_no_vhost_user_device() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        assert!(values_of(&args, "-device").is_empty(), "{args:?}");
    }

    #[test]
    fn vhost_user_devices_use_the_connections_made_for_them() {
        let config = config()
            .with_vsock("/run/vsock.sock")
            .with_fs("/run/fs.sock", "kataShared")
            .with_net("/run/net.sock", [2, 0, 0, 0, 0, 1], 1500);
        let args = args_of(&config, ResolvedAccel::Tcg);
        let chardevs = values_of(&args, "-chardev");
        for wanted in [
            "socket,id=vsock,fd=12",
            "socket,id=fs,fd=13",
            // QEMU's vhost-user netdev takes only a socket it connected.
            "socket,id=net,path=/run/net.sock",
        ] {
            assert!(chardevs.contains(&wanted), "{wanted} in {chardevs:?}");
        }
        assert!(
            !args.iter().any(|arg| arg.contains("/run/")
                && !arg.starts_with("guest=")
                && !arg.ends_with("path=/run/net.sock")),
            "a socket path other than the net device's reached QEMU: {args:?}"
        );
        assert_eq!(
            values_of(&args, "-device"),
            [
                "vhost-user-vsock-device,chardev=vsock",
                "vhost-user-fs-device,chardev=fs,tag=kataShared",
                "virtio-net-device,netdev=pod0,mac=02:00:00:00:00:01,host_mtu=1500"
            ]
        );
        assert_eq!(value_of(&args, "-netdev"), "vhost-user,id=pod0,chardev=net");
        assert_eq!(fds(&config).all(), [10, 11, 12, 13]);
    }

    #[test]
    fn commas_in_the_name_and_tags_are_doubled() {
        let config = QemuVmConfig::new("/k", "/i", "/logs/c.log")
            .with_work_dir("/run/v,m")
            .with_fs("/run/fs.sock", "x,y");
        let args = args_of(&config, ResolvedAccel::Tcg);
        assert_eq!(value_of(&args, "-name"), "guest=/run/v,,m");
        assert_eq!(
            values_of(&args, "-device"),
            ["vhost-user-fs-device,chardev=fs,tag=x,,y"]
        );
    }

    #[test]
    fn overlong_fs_tag_is_rejected() {
        let config = config().with_fs("/run/fs.sock", "t".repeat(MAX_FS_TAG_BYTES + 1));
        let error = qemu_arguments(&config, ResolvedAccel::Tcg, &fds(&config)).unwrap_err();
        assert!(error.to_string().contains("fs.tag"), "{error}");
    }

    #[test]
    fn socket_path_longer_than_sun_path_is_rejected_with_its_path() {
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH_BYTES));
        let config = config().with_vsock(&long);
        let error = qemu_arguments(&config, ResolvedAccel::Tcg, &fds(&config)).unwrap_err();
        assert!(error.to_string().contains(&long), "{error}");
    }

    #[test]
    fn zero_vcpus_tiny_memory_and_multi_line_cmdline_are_rejected() {
        let q = &fds(&config());
        let tcg = ResolvedAccel::Tcg;
        assert!(qemu_arguments(&config().with_vcpus(0), tcg, q).is_err());
        assert!(qemu_arguments(&config().with_memory_mib(16), tcg, q).is_err());
        assert!(qemu_arguments(&config().append_cmdline("a\nb"), tcg, q).is_err());
    }
}
