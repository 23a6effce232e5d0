//! The guest artifacts the guest-tier suites and benches need: the cached
//! product kernel, the static `husk-agent` (built fresh, as `make agent`
//! does, so a stale agent never runs) and the product initramfs packed from
//! it by `rootfs-image/mkinitramfs.py`.
//!
//! A missing artifact is an error naming the command that makes it: the
//! guest tier never skips silently (see `../shared/ARCHITECTURE.md`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// The target the static agent is linked for.
pub const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The workspace root (the parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is absolute and tests/ sits inside the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The guest kernel and the release it reports in `uname -r`.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    pub bzimage: PathBuf,
    pub release: String,
}

/// The product kernel: `$HUSK_BZIMAGE` or `build/bzImage`.
pub fn guest_kernel() -> Result<GuestKernel> {
    let bzimage = std::env::var_os("HUSK_BZIMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/bzImage"));
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

/// The command that builds the static agent, for messages.
pub const STATIC_AGENT_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p husk-agent --target x86_64-unknown-linux-gnu";

/// Builds the static `husk-agent` once per process (a no-op for cargo when
/// it is current) into the cargo target directory this program was built
/// in, and returns its path.
pub fn static_agent() -> Result<PathBuf> {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    AGENT
        .get_or_init(|| build_static_agent().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_static_agent() -> Result<PathBuf> {
    let target_dir = cargo_target_dir()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "-p",
            "husk-agent",
            "--target",
            GUEST_TRIPLE,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .with_context(|| format!("cannot run {cargo:?} to build the static agent"))?;
    ensure!(
        status.success(),
        "building the static agent failed ({status}); the command is: {STATIC_AGENT_COMMAND}"
    );
    let agent = target_dir
        .join(GUEST_TRIPLE)
        .join("release")
        .join("husk-agent");
    ensure!(
        agent.is_file(),
        "cargo built no {}; the command is: {STATIC_AGENT_COMMAND}",
        agent.display()
    );
    eprintln!(
        "static husk-agent ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        agent.display()
    );
    Ok(agent)
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

/// Packs the product initramfs (the static agent as `/init`, nothing else)
/// at `output` with `rootfs-image/mkinitramfs.py`.
pub fn pack_product_initramfs(agent: &Path, output: &Path) -> Result<()> {
    let script = workspace_root().join("rootfs-image/mkinitramfs.py");
    let result = Command::new("python3")
        .arg(&script)
        .arg(agent)
        .arg(output)
        .output()
        .with_context(|| format!("cannot run python3 {}", script.display()))?;
    ensure!(
        result.status.success(),
        "`python3 {} {} {}` failed ({}): {}",
        script.display(),
        agent.display(),
        output.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    Ok(())
}

/// The product initramfs built from a fresh static agent, once per process,
/// in the target directory (`husk-tests/agent-initramfs.cpio.gz`).
pub fn product_initramfs() -> Result<PathBuf> {
    static INITRD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INITRD
        .get_or_init(|| {
            let build = || -> Result<PathBuf> {
                let agent = static_agent()?;
                let dir = cargo_target_dir()?.join("husk-tests");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let output = dir.join("agent-initramfs.cpio.gz");
                pack_product_initramfs(&agent, &output)?;
                Ok(output)
            };
            build().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The static busybox the test containers are made of (`$HUSK_BUSYBOX` or
/// `/bin/busybox`).
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
