//! Guest tier, without devices: the product guest kernel boots under the
//! `qemu` backend to our agent, runs a busybox script from a test
//! initramfs, reports its exit code on the console and powers off; the
//! backend then leaves no QEMU process, socket or run directory behind.
//!
//! Runs under KVM where the host's KVM runs stock guests, under TCG
//! otherwise (this PVM host); the `husk-test-form:` line says which.

mod guest_harness;

use std::time::{Duration, Instant};

use guest_harness::{
    announce_qemu_form, prepare_test_guest, test_vm_config, Console, TestGuest, GUEST_DEADLINE,
};
use husk_shim::hypervisor::qemu::{GuestEnd, QemuVm};
use husk_test_support::artifacts::{guest_kernel, host_kernel_release, product_initramfs};
use husk_test_support::host::{process_exists, processes_mentioning};
use husk_test_support::tempdir::TestDir;

/// The script's exit code when all its checks pass (see boot-checks.sh).
const SCRIPT_SUCCESS_CODE: i32 = 42;

#[test]
fn guest_kernel_runs_the_agent_and_a_script_then_powers_off_leaving_nothing_behind() {
    let TestGuest {
        dir,
        kernel,
        initrd,
    } = prepare_test_guest("guest-boot", "boot-checks.sh");
    let config = test_vm_config(&dir, &kernel, &initrd)
        .with_vcpus(2)
        .with_memory_mib(256);
    let work_dir = config.work_dir.clone();

    let started = Instant::now();
    let vm = QemuVm::start(config).expect("QEMU starts");
    announce_qemu_form("guest boot", vm.accel());
    let (pid, run_dir) = (vm.pid(), vm.run_dir().to_path_buf());
    // QEMU's sockets are inherited fds: nothing of it in the filesystem.
    let sockets: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .filter(|entry| std::os::unix::fs::FileTypeExt::is_socket(&entry.file_type().unwrap()))
        .map(|entry| entry.path())
        .collect();
    assert!(
        sockets.is_empty(),
        "sockets in the run directory: {sockets:?}"
    );
    // It runs as the unprivileged uid it was given (the default).
    let identity = vm
        .identity()
        .expect("QEMU runs unprivileged by default")
        .clone();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|id| id == identity.uid.to_string()),
        "QEMU runs as {identity}, /proc says {uid_line}"
    );
    let end = vm.wait_or_stop(GUEST_DEADLINE);
    let elapsed = started.elapsed();
    let console = Console::read(&dir.join("console.log"));
    println!(
        "guest boot + script + power-off: {:.2} s",
        elapsed.as_secs_f64()
    );

    assert_eq!(end, GuestEnd::PoweredOff, "console:\n{}", console.text);
    let ready = console
        .readiness()
        .unwrap_or_else(|| panic!("no HUSK_AGENT_READY on the console:\n{}", console.text));
    assert_eq!(
        ready.get("cpus").map(String::as_str),
        Some("2"),
        "{ready:?}"
    );
    assert_eq!(ready.get("kernel"), Some(&kernel.release), "{ready:?}");

    console.assert_checks_passed(&[
        "pid1_is_the_agent",
        "kernel_filesystems_mounted",
        "cmdline_has_the_qemu_defaults",
        "root_is_writable",
    ]);
    assert_eq!(
        console.exec_exit_code(),
        Some(SCRIPT_SUCCESS_CODE),
        "the script's exit code reaches the console:\n{}",
        console.text
    );

    let guest_release = console.value("uname_r");
    assert_eq!(
        guest_release, kernel.release,
        "uname -r in the guest is the bzImage's release"
    );
    assert!(guest_release.starts_with("6.12."), "{guest_release}");
    let host_release = host_kernel_release().expect("the host's kernel release");
    assert_ne!(
        guest_release, host_release,
        "the guest must not report the host's kernel"
    );
    assert_eq!(console.value("cpus"), "2");
    let mem_total_mib = console.value("mem_total_kib").parse::<u64>().unwrap() / 1024;
    assert!(
        (128..=256).contains(&mem_total_mib),
        "a 256 MiB guest reports {mem_total_mib} MiB MemTotal"
    );

    assert!(!process_exists(pid), "QEMU (pid {pid}) is gone and reaped");
    assert!(
        processes_mentioning(dir.path()).is_empty(),
        "no process uses the test directory"
    );
    assert!(
        !run_dir.exists(),
        "the run directory {} is removed",
        run_dir.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&work_dir).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "the work directory is empty: {leftovers:?}"
    );
}

#[test]
fn product_initramfs_boots_to_readiness_and_powers_off_on_request() {
    let dir = TestDir::new("guest-product-initrd").expect("a test directory");
    let kernel = guest_kernel().expect("the guest kernel");
    let initrd = product_initramfs().expect("the product initramfs");
    let config = test_vm_config(&dir, &kernel, &initrd)
        .with_cmdline(husk_shim::hypervisor::qemu::DEFAULT_QEMU_CMDLINE)
        .append_cmdline("quiet husk.power_off_after_ms=100");
    let vm = QemuVm::start(config).expect("QEMU starts");
    announce_qemu_form("product initramfs boot", vm.accel());
    let end = vm.wait_or_stop(GUEST_DEADLINE);
    let console = Console::read(&dir.join("console.log"));

    assert_eq!(end, GuestEnd::PoweredOff, "console:\n{}", console.text);
    let ready = console
        .readiness()
        .unwrap_or_else(|| panic!("no HUSK_AGENT_READY on the console:\n{}", console.text));
    assert_eq!(ready.get("kernel"), Some(&kernel.release), "{ready:?}");
}

#[test]
fn stop_ends_a_running_guest_over_qmp() {
    let dir = TestDir::new("guest-stop").expect("a test directory");
    let kernel = guest_kernel().expect("the guest kernel");
    let initrd = product_initramfs().expect("the product initramfs");
    // Without husk.exec the agent serves its console and never powers off.
    let config = test_vm_config(&dir, &kernel, &initrd)
        .with_cmdline(husk_shim::hypervisor::qemu::DEFAULT_QEMU_CMDLINE)
        .append_cmdline("quiet");
    let mut vm = QemuVm::start(config).expect("QEMU starts");
    let pid = vm.pid();
    let run_dir = vm.run_dir().to_path_buf();
    let status = vm
        .qmp()
        .expect("QMP is connected while the VM runs")
        .execute("query-status", None)
        .expect("query-status answers");
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(
        vm.wait(Duration::from_millis(200)),
        None,
        "the guest keeps running"
    );

    let end = vm.stop();
    assert_eq!(end, GuestEnd::Stopped);
    assert!(!process_exists(pid), "QEMU (pid {pid}) is gone and reaped");
    assert!(
        !run_dir.exists(),
        "the run directory {} is removed",
        run_dir.display()
    );
}
