//! What only `tests/tests/guest_{boot,devices}.rs` need, beside the shared
//! helpers of `husk-test-support` (artifacts, the test initramfs, test
//! directories, form lines, leak checks): the QEMU configuration that boots
//! a test initramfs's script, the console markers the guest scripts print
//! (`tests/guest/lib.sh`) read after the guest ended ([`Console`]) or
//! followed while it runs ([`ConsoleWatch`]), and the host side of hybrid
//! vsock ([`hybrid_vsock`]).

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_shim::hypervisor::qemu::{AccelChoice, QemuVmConfig};
use husk_test_support::artifacts::{build_test_initramfs, guest_file, guest_kernel, GuestKernel};
use husk_test_support::form::announce_form;
use husk_test_support::tempdir::TestDir;

pub mod hybrid_vsock;

/// How long a TCG guest may take to run its script. A boot takes about
/// 1.5 s here; the device checks move hundreds of MiB under emulation.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(300);

/// One test guest's files: its directory, the product kernel, and the test
/// initramfs running a script from `tests/guest/`, packed in the directory.
pub struct TestGuest {
    pub dir: TestDir,
    pub kernel: GuestKernel,
    pub initrd: PathBuf,
}

/// Prepares the files of test `name`, whose guest runs `tests/guest/<script>`.
pub fn prepare_test_guest(name: &str, script: &str) -> TestGuest {
    let dir = TestDir::new(name).expect("a test directory");
    let kernel = guest_kernel().expect("the guest kernel");
    let initrd = dir.join("initrd.cpio.gz");
    let script = guest_file(script).expect("the guest script");
    build_test_initramfs(&initrd, &script, &[]).expect("the test initramfs");
    TestGuest {
        dir,
        kernel,
        initrd,
    }
}

/// A guest config booting `initrd` on the product kernel, running
/// `/test/run`, with its console in `dir/console.log` and its run directory
/// under `dir/work`.
pub fn test_vm_config(dir: &TestDir, kernel: &GuestKernel, initrd: &Path) -> QemuVmConfig {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("the test directory is writable");
    QemuVmConfig::new(&kernel.bzimage, initrd, dir.join("console.log"))
        .append_cmdline("quiet husk.exec=/test/run")
        .with_work_dir(work)
}

/// Announces that `what` ran in QEMU with `accel`, and why that one.
pub fn announce_qemu_form(what: &str, accel: &AccelChoice) {
    announce_form(format_args!(
        "{what} via qemu ({}, {})",
        accel.accel, accel.reason
    ));
}

/// What a guest printed on its console, parsed for the harness markers.
#[derive(Debug, Clone)]
pub struct Console {
    pub text: String,
}

/// One `HUSK_CHECK` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub passed: bool,
    pub detail: String,
}

impl Console {
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read the console log {}: {e}", path.display()));
        Self {
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// The text after `marker` on each line holding it.
    fn after<'a>(&'a self, marker: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.text
            .lines()
            .filter_map(move |line| line.find(marker).map(|at| line[at + marker.len()..].trim()))
    }

    /// `key=value` pairs of the agent's readiness line, if it was printed.
    pub fn readiness(&self) -> Option<BTreeMap<String, String>> {
        self.after("HUSK_AGENT_READY").next().map(pairs)
    }

    /// The `N` of `HUSK_EXEC_EXIT code=N`.
    pub fn exec_exit_code(&self) -> Option<i32> {
        self.after("HUSK_EXEC_EXIT code=")
            .next()
            .and_then(|code| code.parse().ok())
    }

    /// Every `HUSK_CHECK <name> ok|FAIL <detail>` line, by name.
    pub fn checks(&self) -> BTreeMap<String, CheckResult> {
        self.after("HUSK_CHECK ")
            .filter_map(|rest| {
                let mut words = rest.splitn(3, ' ');
                let name = words.next()?.to_owned();
                let passed = words.next()? == "ok";
                let detail = words.next().unwrap_or("").to_owned();
                Some((name, CheckResult { passed, detail }))
            })
            .collect()
    }

    /// Every `HUSK_VALUE <key>=<value>` line, by key.
    pub fn values(&self) -> BTreeMap<String, String> {
        self.after("HUSK_VALUE ")
            .filter_map(|rest| {
                let (key, value) = rest.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            })
            .collect()
    }

    /// The value of `key`, failing the test with the console if absent.
    pub fn value(&self, key: &str) -> String {
        self.values()
            .remove(key)
            .unwrap_or_else(|| panic!("the guest reported no {key}; console:\n{}", self.text))
    }

    /// Asserts that each named check ran in the guest and passed.
    pub fn assert_checks_passed(&self, names: &[&str]) {
        let checks = self.checks();
        let mut problems = Vec::new();
        for name in names {
            match checks.get(*name) {
                Some(CheckResult { passed: true, .. }) => {}
                Some(CheckResult { detail, .. }) => {
                    problems.push(format!("{name} failed: {detail}"))
                }
                None => problems.push(format!("{name} did not run")),
            }
        }
        for (name, result) in &checks {
            if !result.passed && !names.contains(&name.as_str()) {
                problems.push(format!(
                    "{name} (not asserted by the test) failed: {}",
                    result.detail
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "guest checks: {}\nconsole:\n{}",
            problems.join("; "),
            self.text
        );
    }
}

/// `a=1 b=2` as a map.
pub fn pairs(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Follows a running guest's console log for the lines host-side steps
/// wait for. Clones share the `guest_ended` flag: once the caller sets it,
/// waits give up at once instead of running into their timeout.
#[derive(Debug, Clone)]
pub struct ConsoleWatch {
    pub path: PathBuf,
    pub guest_ended: Arc<AtomicBool>,
}

impl ConsoleWatch {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            guest_ended: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Waits until a console line contains `needle` and returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the flag before the log: a line printed just before the
            // guest ended is still found.
            let ended = self.guest_ended.load(Ordering::SeqCst);
            let text = std::fs::read(&self.path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if let Some(line) = text.lines().find(|line| line.contains(needle)) {
                return Ok(line.to_owned());
            }
            if ended {
                return Err(format!("the guest ended without printing {needle:?}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the console showed no {needle:?} within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Tells every waiter that the guest is gone.
    pub fn guest_has_ended(&self) {
        self.guest_ended.store(true, Ordering::SeqCst);
    }

    pub fn has_guest_ended(&self) -> bool {
        self.guest_ended.load(Ordering::SeqCst)
    }
}
