//! The QEMU command line for one guest, assembled from a [`QemuVmConfig`].
//!
//! The machine is `microvm` without ACPI (QEMU then lists the virtio-mmio
//! devices on the kernel command line), its memory a shared memfd so that
//! vhost-user servers can map it, no default devices, and `-no-reboot` so a
//! guest reset ends QEMU. The virtio-mmio transports speak virtio 1.x (MMIO
//! version 2) instead of microvm's legacy default. QEMU starts with its
//! vCPUs stopped (`-S`): the guest runs only once the backend recorded the
//! QEMU pid and sent QMP `cont`. The console goes to a Unix socket in the
//! VM's run directory that the backend listens on (QEMU connects to it at
//! startup; the backend caps what it keeps), and QMP to a Unix socket QEMU
//! listens on in the same directory. Values
//! embedded in `-chardev` and `-device` option strings have their commas
//! doubled, QEMU's escape.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

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

/// The sockets of a VM's run directory named on its command line.
#[derive(Debug, Clone)]
pub struct RunSockets {
    /// QMP: QEMU listens, the backend connects.
    pub qmp: PathBuf,
    /// The serial console: the backend listens, QEMU connects.
    pub console: PathBuf,
}

/// The virtio-balloon device QEMU gives a guest for free page reporting.
pub const FREE_PAGE_REPORTING_DEVICE: &str = "virtio-balloon-device,free-page-reporting=on";

/// QEMU's `-sandbox` option: every denial it offers.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The arguments (without the program) that start `config`'s guest with
/// `accel`, paused, its QMP monitor and console on `sockets`.
pub fn qemu_arguments(
    config: &QemuVmConfig,
    accel: ResolvedAccel,
    sockets: &RunSockets,
) -> Result<Vec<OsString>, QemuError> {
    validate(config, sockets)?;
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

    // A client socket without `reconnect`: QEMU connects while it starts
    // and fails to start if the backend does not listen.
    let console = chardev("socket", CONSOLE_CHARDEV, &sockets.console, "");
    push(&[&"-chardev", &console]);
    push(&[&"-serial", &format!("chardev:{CONSOLE_CHARDEV}")]);

    let qmp = chardev(
        "socket",
        QMP_CHARDEV,
        sockets.qmp.as_os_str(),
        ",server=on,wait=off",
    );
    push(&[&"-chardev", &qmp]);
    push(&[&"-mon", &format!("chardev={QMP_CHARDEV},mode=control")]);

    if let Some(vsock) = &config.vsock {
        let socket = chardev("socket", VSOCK_CHARDEV, &vsock.socket, "");
        push(&[&"-chardev", &socket]);
        push(&[
            &"-device",
            &format!("vhost-user-vsock-device,chardev={VSOCK_CHARDEV}"),
        ]);
    }
    if let Some(fs) = &config.fs {
        let socket = chardev("socket", FS_CHARDEV, &fs.socket, "");
        push(&[&"-chardev", &socket]);
        let mut device = OsString::from(format!("vhost-user-fs-device,chardev={FS_CHARDEV},tag="));
        device.push(escape_option_value(OsStr::new(&fs.tag)));
        push(&[&"-device", &device]);
    }
    if let Some(net) = &config.net {
        let socket = chardev("socket", NET_CHARDEV, &net.socket, "");
        push(&[&"-chardev", &socket]);
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

/// `-chardev <backend>,id=<id>,path=<escaped path><extra>`.
fn chardev(backend: &str, id: &str, path: impl AsRef<OsStr>, extra: &str) -> OsString {
    let mut option = OsString::from(format!("{backend},id={id},path="));
    option.push(escape_option_value(path.as_ref()));
    option.push(extra);
    option
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
fn validate(config: &QemuVmConfig, sockets: &RunSockets) -> Result<(), QemuError> {
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
    check_socket_path(&sockets.qmp)?;
    check_socket_path(&sockets.console)?;
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
    }

    fn sockets() -> RunSockets {
        RunSockets {
            qmp: "/run/vm/qmp.sock".into(),
            console: "/run/vm/console.sock".into(),
        }
    }

    fn args_of(config: &QemuVmConfig, accel: ResolvedAccel) -> Vec<String> {
        qemu_arguments(config, accel, &sockets())
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
    fn console_goes_to_the_backends_socket_and_qmp_to_qemus() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        let chardevs = values_of(&args, "-chardev");
        // QEMU is the client of the console socket (no server=on), and the
        // console log file is not QEMU's to write.
        assert!(
            chardevs.contains(&"socket,id=console,path=/run/vm/console.sock"),
            "{chardevs:?}"
        );
        assert!(
            !args.iter().any(|arg| arg.contains("console.log")),
            "{args:?}"
        );
        assert!(
            chardevs.contains(&"socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off"),
            "{chardevs:?}"
        );
        assert_eq!(value_of(&args, "-serial"), "chardev:console");
        assert_eq!(value_of(&args, "-mon"), "chardev=qmp,mode=control");
    }

    #[test]
    fn without_devices_there_is_no_vhost_user_device() {
        let args = args_of(&config(), ResolvedAccel::Tcg);
        assert!(values_of(&args, "-device").is_empty(), "{args:?}");
    }

    #[test]
    fn vhost_user_devices_connect_to_their_sockets() {
        let config = config()
            .with_vsock("/run/vsock.sock")
            .with_fs("/run/fs.sock", "kataShared");
        let args = args_of(&config, ResolvedAccel::Tcg);
        let chardevs = values_of(&args, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=vsock,path=/run/vsock.sock"),
            "{chardevs:?}"
        );
        assert!(
            chardevs.contains(&"socket,id=fs,path=/run/fs.sock"),
            "{chardevs:?}"
        );
        assert_eq!(
            values_of(&args, "-device"),
            [
                "vhost-user-vsock-device,chardev=vsock",
                "vhost-user-fs-device,chardev=fs,tag=kataShared"
            ]
        );
    }

    #[test]
    fn commas_in_paths_and_tags_are_doubled() {
        let config = QemuVmConfig::new("/k", "/i", "/logs/c.log").with_fs("/run/f,s.sock", "x,y");
        let sockets = RunSockets {
            console: "/run/v,m/console.sock".into(),
            ..sockets()
        };
        let args: Vec<String> = qemu_arguments(&config, ResolvedAccel::Tcg, &sockets)
            .unwrap()
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect();
        let chardevs = values_of(&args, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=console,path=/run/v,,m/console.sock"),
            "{chardevs:?}"
        );
        assert!(
            chardevs.contains(&"socket,id=fs,path=/run/f,,s.sock"),
            "{chardevs:?}"
        );
        assert_eq!(
            values_of(&args, "-device"),
            ["vhost-user-fs-device,chardev=fs,tag=x,,y"]
        );
    }

    #[test]
    fn overlong_fs_tag_is_rejected() {
        let config = config().with_fs("/run/fs.sock", "t".repeat(MAX_FS_TAG_BYTES + 1));
        let error = qemu_arguments(&config, ResolvedAccel::Tcg, &sockets()).unwrap_err();
        assert!(error.to_string().contains("fs.tag"), "{error}");
    }

    #[test]
    fn socket_path_longer_than_sun_path_is_rejected_with_its_path() {
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH_BYTES));
        let config = config().with_vsock(&long);
        let error = qemu_arguments(&config, ResolvedAccel::Tcg, &sockets()).unwrap_err();
        assert!(error.to_string().contains(&long), "{error}");
        let console = RunSockets {
            console: long.clone().into(),
            ..sockets()
        };
        let error = qemu_arguments(&self::config(), ResolvedAccel::Tcg, &console).unwrap_err();
        assert!(error.to_string().contains(&long), "{error}");
    }

    #[test]
    fn zero_vcpus_tiny_memory_and_multi_line_cmdline_are_rejected() {
        let q = &sockets();
        let tcg = ResolvedAccel::Tcg;
        assert!(qemu_arguments(&config().with_vcpus(0), tcg, q).is_err());
        assert!(qemu_arguments(&config().with_memory_mib(16), tcg, q).is_err());
        assert!(qemu_arguments(&config().append_cmdline("a\nb"), tcg, q).is_err());
    }
}
