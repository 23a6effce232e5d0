//! The guest-tier harness shared by `tests/tests/guest_{boot,devices}.rs`: find the guest
//! kernel, build the static guest binaries (agent and `husk-guest-probe`),
//! pack a test initramfs with busybox and a script from `tests/guest/`,
//! boot it under the `qemu` backend, and read the console for the markers
//! the guest scripts print (`tests/guest/lib.sh`).
//!
//! Missing artifacts fail the test with the command that makes them: the
//! guest tier never skips silently (see `../shared/ARCHITECTURE.md`).

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use husk_shim::hypervisor::qemu::{AccelChoice, QemuVmConfig};

pub mod hybrid_vsock;

/// The guest's target: the agent and the probe are linked statically for it.
pub const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// How long a TCG guest may take to run its script. A boot takes about
/// 1.5 s here; the device checks move hundreds of MiB under emulation.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(300);

/// The workspace root (the parent of the `vmm` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory") // CARGO_MANIFEST_DIR is absolute
        .to_path_buf()
}

/// A build artifact from `$ENV_VAR` or `build/<name>`; panics with the
/// command that makes it.
fn build_artifact(env_var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build").join(name));
    assert!(
        path.is_file(),
        "the guest artifact {} is missing (${env_var} or build/{name}): run `make kernel initrd` first",
        path.display()
    );
    path
}

/// The guest kernel and the release it reports in `uname -r`.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub bzimage: PathBuf,
    pub release: String,
}

/// The product kernel (`$HUSK_BZIMAGE` or `build/bzImage`).
pub fn guest_kernel() -> GuestKernel {
    let bzimage = build_artifact("HUSK_BZIMAGE", "bzImage");
    let release = bzimage_release(&bzimage);
    GuestKernel { bzimage, release }
}

/// The product initramfs (`$HUSK_INITRD` or `build/initramfs.cpio.gz`).
pub fn product_initrd() -> PathBuf {
    build_artifact("HUSK_INITRD", "initramfs.cpio.gz")
}

/// The kernel release recorded in a bzImage's setup header: `kernel_version`
/// (offset 0x20e) points, relative to 0x200, at a string that starts with
/// the release (Documentation/arch/x86/boot.rst).
pub fn bzimage_release(bzimage: &Path) -> String {
    let image = std::fs::read(bzimage)
        .unwrap_or_else(|e| panic!("cannot read the guest kernel {}: {e}", bzimage.display()));
    assert!(
        image.len() > 0x210 && &image[0x202..0x206] == b"HdrS",
        "{} is not a bzImage (no HdrS setup header)",
        bzimage.display()
    );
    let pointer = u16::from_le_bytes([image[0x20e], image[0x20f]]) as usize + 0x200;
    let text = &image[pointer..(pointer + 256).min(image.len())];
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    String::from_utf8_lossy(text)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{} has an empty kernel version", bzimage.display()))
        .to_owned()
}

/// The static guest programs, built for this test run.
#[derive(Debug)]
pub struct GuestBinaries {
    pub agent: PathBuf,
    pub probe: PathBuf,
}

/// Builds `husk-agent` and `husk-guest-probe` statically (as `make agent`
/// does) once per test binary; cargo makes this a no-op when they are
/// current, and using them fresh keeps a stale agent out of the test.
pub fn guest_binaries() -> &'static GuestBinaries {
    static BINARIES: OnceLock<GuestBinaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let target_dir = cargo_target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let started = Instant::now();
        let status = Command::new(&cargo)
            .current_dir(workspace_root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "--target", GUEST_TRIPLE])
            .args(["-p", "husk-agent", "-p", "husk-guest-probe"])
            .arg("--target-dir")
            .arg(&target_dir)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the guest binaries: {e}"));
        assert!(
            status.success(),
            "building the static guest binaries failed ({status}): try `make agent`"
        );
        eprintln!(
            "guest binaries ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let release = target_dir.join(GUEST_TRIPLE).join("release");
        GuestBinaries {
            agent: release.join("husk-agent"),
            probe: release.join("husk-guest-probe"),
        }
    })
}

/// The cargo target directory this test binary was built in: the nearest
/// ancestor of the executable holding cargo's `CACHEDIR.TAG`.
fn cargo_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    exe.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The static busybox for test images (`$HUSK_BUSYBOX` or `/bin/busybox`).
pub fn busybox() -> PathBuf {
    let path = std::env::var_os("HUSK_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    assert!(
        path.is_file(),
        "{} is missing: install Debian's busybox-static package (`make deps`)",
        path.display()
    );
    path
}

/// A guest-side script or program in `tests/guest/`.
pub fn guest_file(name: &str) -> PathBuf {
    let path = workspace_root().join("tests/guest").join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// A directory for one test, removed on drop.
#[derive(Debug)]
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("husk-guest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Packs `output`: the fresh agent as /init, busybox, `/test/lib.sh`,
/// `script` as `/test/run`, `husk-guest-probe` in /bin, and `extra`
/// (source, guest path) files.
pub fn build_test_initramfs(output: &Path, script: &Path, extra: &[(PathBuf, &str)]) {
    let binaries = guest_binaries();
    let mut command = Command::new("python3");
    command
        .arg(workspace_root().join("rootfs-image/mkinitramfs.py"))
        .arg(&binaries.agent)
        .arg(output)
        .arg("--busybox")
        .arg(busybox());
    let mut files: Vec<(PathBuf, String)> = vec![
        (guest_file("lib.sh"), "/test/lib.sh:644".to_owned()),
        (script.to_path_buf(), "/test/run".to_owned()),
        (binaries.probe.clone(), "/bin/husk-guest-probe".to_owned()),
    ];
    files.extend(
        extra
            .iter()
            .map(|(src, dest)| (src.clone(), (*dest).to_owned())),
    );
    for (src, dest) in files {
        command
            .arg("--add")
            .arg(format!("{}:{dest}", src.display()));
    }
    let output_text = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 for mkinitramfs.py: {e}"));
    assert!(
        output_text.status.success(),
        "mkinitramfs.py failed: {}",
        String::from_utf8_lossy(&output_text.stderr)
    );
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

/// Prints the line the tier runner collects to show which form ran.
pub fn announce_form(what: &str, accel: &AccelChoice) {
    println!(
        "husk-test-form: {what} via qemu ({}, {})",
        accel.accel, accel.reason
    );
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

/// Processes whose command line mentions `path` (a QEMU left behind would).
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Whether a process with this id exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
