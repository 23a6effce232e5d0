//! `husk-ctl check` on this host, as an operator runs it: the KVM line and
//! the backend line say what this host's KVM is and which backend `auto`
//! picks, and a configuration whose guest kernel is missing fails, naming
//! the setting and the path.

use std::path::Path;
use std::process::Command;

use husk_test_support::form::announce_form;
use husk_test_support::tempdir::TestDir;

/// Runs `husk-ctl check` with `config` (and a containerd configuration that
/// does not exist, so the host's own is never read): (exit code, stdout).
fn check(config: &Path, work: &TestDir) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_husk-ctl"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .arg("--containerd-config")
        .arg(work.join("no-containerd-config.toml"))
        .output()
        .expect("husk-ctl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn config_with(work: &TestDir, kernel: &Path, initrd: &Path) -> std::path::PathBuf {
    let path = work.join("configuration.toml");
    std::fs::write(
        &path,
        format!(
            "[hypervisor]\nkernel = \"{k}\"\nqemu_kernel = \"{k}\"\ninitrd = \"{i}\"\n",
            k = kernel.display(),
            i = initrd.display()
        ),
    )
    .unwrap();
    path
}

fn line_of<'a>(report: &'a str, what: &str) -> Vec<&'a str> {
    report
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some(what))
        .collect()
}

#[test]
fn check_names_this_hosts_kvm_and_the_backend_auto_picks() {
    let work = TestDir::new("husk-ctl-check").unwrap();
    let kernel = work.join("bzImage");
    let initrd = work.join("initramfs.cpio.gz");
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&initrd, b"initrd").unwrap();
    let (_, report) = check(&config_with(&work, &kernel, &initrd), &work);
    println!("{report}");
    let kvm = line_of(&report, "kvm").join("\n");
    let backend = line_of(&report, "backend").join("\n");
    if Path::new("/sys/module/kvm_pvm").exists() {
        announce_form("husk-ctl check: PVM host (kvm_pvm loaded): expects PVM and qemu");
        assert!(kvm.starts_with("warn") && kvm.contains("PVM"), "{kvm}");
        assert!(backend.contains("qemu (auto: PVM"), "{backend}");
    } else if Path::new("/dev/kvm").exists() {
        announce_form("husk-ctl check: KVM without kvm_pvm: expects hardware and builtin");
        assert!(
            kvm.starts_with("ok") && kvm.contains("hardware-assisted"),
            "{kvm}"
        );
        assert!(backend.contains("builtin (auto:"), "{backend}");
    } else {
        announce_form("husk-ctl check: no /dev/kvm: expects TCG and qemu");
        assert!(kvm.contains("cannot open /dev/kvm"), "{kvm}");
        assert!(backend.contains("qemu (auto:"), "{backend}");
    }
    let guest = line_of(&report, "guest");
    assert_eq!(
        guest.len(),
        2,
        "a kernel line and an initrd line: {guest:?}"
    );
    assert!(guest.iter().all(|line| line.starts_with("ok")), "{guest:?}");
}

#[test]
fn a_missing_guest_kernel_fails_naming_the_setting_and_the_path() {
    let work = TestDir::new("husk-ctl-check").unwrap();
    let initrd = work.join("initramfs.cpio.gz");
    std::fs::write(&initrd, b"initrd").unwrap();
    let missing = work.join("no-such-kernel");
    let (code, report) = check(&config_with(&work, &missing, &initrd), &work);
    println!("{report}");
    assert_eq!(code, 1, "check exits 1 when a line failed");
    let failed: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failed.len(), 1, "only the kernel fails: {failed:?}");
    assert!(
        failed[0].contains("kernel = ") && failed[0].contains(&missing.display().to_string()),
        "{}",
        failed[0]
    );
    assert!(report.contains("verdict: 1 check(s) failed"), "{report}");
}
