//! The guest kernel's virtio drivers probing our virtio-mmio vsock and fs
//! devices in the built-in VMM.
//!
//! Full form (hardware-assisted KVM): the guest boots to the agent, and both
//! devices reach DRIVER_OK (feature negotiation and queue setup done by the
//! real Linux drivers). PVM form: the guest stops during early boot, long
//! before drivers probe, so the test checks what it can — the kernel
//! received both `virtio_mmio.device=` entries with the right window and
//! interrupt — and says the probe itself was not reached.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_devices::fs::{FsConfig, VirtioFs};
use husk_devices::status::DRIVER_OK;
use husk_devices::vsock::{VsockConfig, VsockDevice};
use husk_vmm::host::{probe_host_kvm, HostKvm};
use husk_vmm::{SerialSink, SharedBuffer, VmBuilder, VmExit};

const BOOT_DEADLINE: Duration = Duration::from_secs(180);

fn artifact(env: &str, name: &str) -> PathBuf {
    let path = std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../build")
            .join(name)
    });
    assert!(
        path.exists(),
        "{} is missing: run `make kernel initrd`",
        path.display()
    );
    path
}

#[test]
fn guest_drivers_probe_the_vsock_and_fs_devices() {
    let host = probe_host_kvm();
    if let HostKvm::Unavailable { reason } = &host {
        println!("husk-test-form: virtio-mmio probe: NOT RUN, no usable KVM ({reason})");
        return;
    }
    let kernel = artifact("HUSK_KERNEL", "vmlinux");
    let initrd = artifact("HUSK_INITRD", "initramfs.cpio.gz");
    let work = std::env::temp_dir().join(format!("husk-virtio-probe-{}", std::process::id()));
    let share = work.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let fds_before = common::open_fd_count();
    let threads_before = common::thread_count();

    let vsock = VsockDevice::new(VsockConfig::new(3, work.join("vsock.sock")))
        .expect("the vsock device starts");
    let fs = VirtioFs::new(FsConfig::new(&share)).expect("the fs device starts");
    let console = SharedBuffer::default();
    let full_boot = host.runs_stock_guests();
    let cmdline = if full_boot {
        "console=ttyS0 reboot=k panic=1 husk.power_off_after_ms=200"
    } else {
        "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1"
    };
    let mut vm = VmBuilder::new()
        .memory_mib(256)
        .linux(&kernel, Some(initrd), cmdline)
        .virtio_device(Box::new(vsock))
        .virtio_device(Box::new(fs))
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("the VM builds");
    let guest_cmdline = vm.guest_cmdline().unwrap().to_owned();
    let vsock_entry = format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        husk_arch::VIRTIO_MMIO_BASE,
        husk_arch::IRQ_BASE
    );
    let fs_entry = format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        husk_arch::VIRTIO_MMIO_BASE + husk_arch::VIRTIO_MMIO_WINDOW_SIZE,
        husk_arch::IRQ_BASE + 1
    );
    assert!(guest_cmdline.contains(&vsock_entry), "{guest_cmdline}");
    assert!(guest_cmdline.contains(&fs_entry), "{guest_cmdline}");

    vm.start().expect("the vCPUs start");
    let started = Instant::now();
    let mut ended = None;
    while started.elapsed() < BOOT_DEADLINE {
        if let Some(exit) = vm.wait(Some(Duration::from_millis(200))).unwrap() {
            ended = Some(exit);
            break;
        }
        let text = String::from_utf8_lossy(&console.0.lock().unwrap()).replace('\r', "");
        if !full_boot && text.contains("Command line:") {
            break;
        }
    }
    let statuses: Vec<u32> = vm
        .virtio_transports()
        .iter()
        .map(|t| t.lock().unwrap().device_status())
        .collect();
    let exit = match ended {
        Some(exit) => exit,
        None => vm.stop(),
    };
    let output = String::from_utf8_lossy(&console.0.lock().unwrap()).replace('\r', "");
    drop(vm);
    if full_boot {
        assert_eq!(
            exit,
            VmExit::Reset,
            "the guest powers off cleanly:\n{output}"
        );
        for (status, name) in statuses.iter().zip(["vsock", "fs"]) {
            assert_ne!(
                status & DRIVER_OK,
                0,
                "the guest driver did not finish probing {name} (status {status:#x})"
            );
        }
        println!("husk-test-form: virtio-mmio probe: full form (hardware KVM), vsock and fs reached DRIVER_OK");
    } else {
        assert!(
            output.contains(&format!("Command line: {guest_cmdline}")),
            "{output}"
        );
        println!(
            "husk-test-form: virtio-mmio probe: NOT REACHED on this host ({}): the guest stops before drivers probe; \
             checked that the kernel received both device entries ({vsock_entry}, {fs_entry}); \
             the drivers' probe of these models runs in the guest tier over vhost-user",
            host.describe()
        );
    }
    std::fs::remove_dir_all(&work).unwrap();
    assert!(!work.join("vsock.sock").exists());
    assert_eq!(
        common::open_fd_count(),
        fds_before,
        "device fds are closed with the VM"
    );
    assert_eq!(
        common::thread_count(),
        threads_before,
        "device threads end with the VM"
    );
}
