//! The artifacts the suites and benches run: the workspace and the cargo
//! target directory they were built in, the cached product kernel (and the
//! release it reports), the static guest programs (`husk-agent` and
//! `husk-guest-probe`, built fresh as `make agent` does, so a stale agent
//! never runs), the product initramfs and the guest tier's test initramfs
//! packed from them by `rootfs-image/mkinitramfs.py`, busybox, and the
//! host's own kernel release.
//!
//! A missing artifact is an error naming the command that makes it: the
//! guest tier never skips silently (see `docs/architecture.md`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// The target the static guest programs are linked for.
pub const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The command that builds the static guest programs, for messages.
pub const STATIC_BUILD_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --profile guest -p husk-agent -p husk-guest-probe --target x86_64-unknown-linux-gnu";

/// The workspace root (this crate lives in `tests/support`).
pub fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is absolute and two levels inside the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A build artifact: `$env_var`, else `default` in the workspace (the
/// Makefile exports the variables).
fn built_artifact(env_var: &str, default: &str) -> PathBuf {
    std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(default))
}

/// The guest artifacts a husk configuration names, as its keys:
/// `$HUSK_KERNEL`, `$HUSK_BZIMAGE` and `$HUSK_INITRD`, else `build/`.
pub fn guest_artifacts() -> [(&'static str, PathBuf); 3] {
    [
        ("kernel", built_artifact("HUSK_KERNEL", "build/vmlinux")),
        (
            "qemu_kernel",
            built_artifact("HUSK_BZIMAGE", "build/bzImage"),
        ),
        (
            "initrd",
            built_artifact("HUSK_INITRD", "build/initramfs.cpio.gz"),
        ),
    ]
}

/// The guest kernel and the release it reports in `uname -r`.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub bzimage: PathBuf,
    pub release: String,
}

/// The product kernel: `$HUSK_BZIMAGE` or `build/bzImage`.
pub fn guest_kernel() -> Result<GuestKernel> {
    let bzimage = built_artifact("HUSK_BZIMAGE", "build/bzImage");
    ensure!(
        bzimage.is_file(),
        "the guest kernel {} is missing ($HUSK_BZIMAGE or build/bzImage): run `make kernel`",
        bzimage.display()
    );
    let release = bzimage_release(&bzimage)?;
    Ok(GuestKernel { bzimage, release })
}

/// The kernel release in a bzImage's setup header: the 16-bit field at
/// 0x20e (`kernel_version`) points, relative to 0x200, at a NUL-terminated
/// string that starts with the release (Documentation/arch/x86/boot.rst).
pub fn bzimage_release(bzimage: &Path) -> Result<String> {
    let image = std::fs::read(bzimage)
        .with_context(|| format!("cannot read the guest kernel {}", bzimage.display()))?;
    ensure!(
        image.len() > 0x210 && &image[0x202..0x206] == b"HdrS",
        "{} is not a bzImage (no HdrS setup header)",
        bzimage.display()
    );
    let start = usize::from(u16::from_le_bytes([image[0x20e], image[0x20f]])) + 0x200;
    let text = image
        .get(start..(start + 256).min(image.len()))
        .with_context(|| format!("{}: kernel_version points past the end", bzimage.display()))?;
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    match String::from_utf8_lossy(text).split_whitespace().next() {
        Some(release) => Ok(release.to_owned()),
        None => bail!("{} has an empty kernel version", bzimage.display()),
    }
}

/// The static guest programs, built for this run.
#[derive(Debug, Clone)]
pub struct GuestBinaries {
    /// `husk-agent`, the guest's PID 1.
    pub agent: PathBuf,
    /// `husk-guest-probe`, the guest side of the device checks.
    pub probe: PathBuf,
}

/// Builds `husk-agent` and `husk-guest-probe` statically once per process
/// (a no-op for cargo when they are current) into the cargo target
/// directory this program was built in.
pub fn guest_binaries() -> Result<GuestBinaries> {
    static BINARIES: OnceLock<Result<GuestBinaries, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| build_guest_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_guest_binaries() -> Result<GuestBinaries> {
    let target_dir = cargo_target_dir()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--profile", "guest", "--target", GUEST_TRIPLE])
        .args(["-p", "husk-agent", "-p", "husk-guest-probe"])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .with_context(|| format!("cannot run {cargo:?} to build the static guest programs"))?;
    ensure!(
        status.success(),
        "building the static guest programs failed ({status}); the command is: {STATIC_BUILD_COMMAND}"
    );
    let built = target_dir.join(GUEST_TRIPLE).join("guest");
    let binaries = GuestBinaries {
        agent: built.join("husk-agent"),
        probe: built.join("husk-guest-probe"),
    };
    for program in [&binaries.agent, &binaries.probe] {
        ensure!(
            program.is_file(),
            "cargo built no {}; the command is: {STATIC_BUILD_COMMAND}",
            program.display()
        );
    }
    eprintln!(
        "static guest programs ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        built.display()
    );
    Ok(binaries)
}

/// The cargo target directory this program was built in: the nearest
/// ancestor of the executable holding cargo's `CACHEDIR.TAG`.
pub fn cargo_target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("the running program has no path")?;
    Ok(exe
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target")))
}

/// Runs `python3 rootfs-image/<script> <args>` (the builders of the
/// initramfs and the OCI test image), failing with its stderr.
pub fn run_rootfs_image_script<I, S>(script: &str, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = workspace_root().join("rootfs-image").join(script);
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let result = Command::new("python3")
        .arg(&path)
        .args(&args)
        .output()
        .with_context(|| format!("cannot run python3 {}", path.display()))?;
    ensure!(
        result.status.success(),
        "`python3 {} {}` failed ({}): {}",
        path.display(),
        args.join(OsStr::new(" ")).to_string_lossy(),
        result.status,
        String::from_utf8_lossy(&result.stderr).trim()
    );
    Ok(())
}

/// Packs `output` with `rootfs-image/mkinitramfs.py`: `agent` as `/init`,
/// then the `--busybox` and `--add` arguments in `extra_args`.
fn mkinitramfs(agent: &Path, output: &Path, extra_args: &[String]) -> Result<()> {
    let mut args = vec![agent.as_os_str(), output.as_os_str()];
    args.extend(extra_args.iter().map(OsStr::new));
    run_rootfs_image_script("mkinitramfs.py", args)
}

/// The product initramfs (the static agent as `/init`, nothing else, as
/// `make initrd` packs it) built from a fresh static agent, once per
/// process, in the target directory (`husk-tests/agent-initramfs.cpio.gz`).
pub fn product_initramfs() -> Result<PathBuf> {
    static INITRD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INITRD
        .get_or_init(|| {
            let build = || -> Result<PathBuf> {
                let agent = guest_binaries()?.agent;
                let dir = cargo_target_dir()?.join("husk-tests");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let output = dir.join("agent-initramfs.cpio.gz");
                mkinitramfs(&agent, &output, &[])?;
                Ok(output)
            };
            build().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A guest-side script or program in `tests/guest/`.
pub fn guest_file(name: &str) -> Result<PathBuf> {
    let path = workspace_root().join("tests/guest").join(name);
    ensure!(path.is_file(), "{} is missing", path.display());
    Ok(path)
}

/// Packs the guest tier's test initramfs at `output`: the fresh agent as
/// `/init`, busybox, `tests/guest/lib.sh` as `/test/lib.sh`, `script` as
/// `/test/run`, `husk-guest-probe` in `/bin`, and the `extra` (source,
/// guest path) files.
pub fn build_test_initramfs(output: &Path, script: &Path, extra: &[(PathBuf, &str)]) -> Result<()> {
    let binaries = guest_binaries()?;
    let mut args = vec!["--busybox".to_owned(), busybox()?.display().to_string()];
    let mut files: Vec<(PathBuf, &str)> = vec![
        (guest_file("lib.sh")?, "/test/lib.sh:644"),
        (script.to_path_buf(), "/test/run"),
        (binaries.probe.clone(), "/bin/husk-guest-probe"),
    ];
    files.extend(extra.iter().cloned());
    for (source, destination) in files {
        args.push("--add".to_owned());
        args.push(format!("{}:{destination}", source.display()));
    }
    mkinitramfs(&binaries.agent, output, &args)
}

/// The static busybox the test containers and images are made of
/// (`$HUSK_BUSYBOX` or `/bin/busybox`).
pub fn busybox() -> Result<PathBuf> {
    let path = std::env::var_os("HUSK_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    ensure!(
        path.is_file(),
        "{} is missing: `apt-get install busybox-static` (or `make deps`)",
        path.display()
    );
    Ok(path)
}

/// The host's own kernel release, to tell it apart from the guest's.
pub fn host_kernel_release() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"), "{manifest}");
    }

    #[test]
    fn a_bzimage_release_is_read_from_its_setup_header() {
        let dir = crate::tempdir::TestDir::new("bzimage").unwrap();
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        // kernel_version = 0x100: the string sits at 0x300.
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let version = b"6.12.7-husk (builder@host) #1 SMP\0";
        image[0x300..0x300 + version.len()].copy_from_slice(version);
        let path = dir.join("bzImage");
        std::fs::write(&path, &image).unwrap();
        assert_eq!(bzimage_release(&path).unwrap(), "6.12.7-husk");

        std::fs::write(&path, vec![0u8; 0x400]).unwrap();
        let error = bzimage_release(&path).unwrap_err().to_string();
        assert!(error.contains("not a bzImage"), "{error}");
    }
}
