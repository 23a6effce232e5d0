//! A private containerd for shell scripts (`make demo`, `make bench`):
//! the same daemon the e2e tier uses (`husk_tests::containerd`).
//!
//! `e2e_env up DIR` starts containerd in DIR (its own root, state, sockets
//! and config; `HUSK_CONFIG` naming a test configuration with the
//! workspace's kernel and initramfs; `containerd-shim-kata-v2` from
//! `$HUSK_SHIM_DIR` or `target/release`), imports the busybox test image
//! and prints shell assignments for `eval`: `CONTAINERD_ADDRESS`,
//! `CONTAINERD_NAMESPACE` (both read by `ctr`), `HUSK_E2E_IMAGE`,
//! `HUSK_E2E_CONTAINERD_PID`, `HUSK_E2E_CONTAINERD_LOG`. The daemon keeps
//! running after this program exits.
//!
//! `e2e_env down DIR` removes what is left in the namespace, stops the
//! daemon, kills leftover shims, unmounts and removes DIR; it prints what
//! it had to force and exits 1 if anything was.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use husk_tests::containerd::{Options, PrivateContainerd, IMAGE, NAMESPACE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("e2e_env: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode> {
    match args {
        [command, dir] if command == "up" => up(Path::new(dir)),
        [command, dir] if command == "down" => down(Path::new(dir)),
        _ => bail!("usage: e2e_env up DIR | e2e_env down DIR"),
    }
}

fn up(dir: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let options = Options::for_tests(dir)?;
    let mut daemon = PrivateContainerd::start(dir, &options)?;
    if let Err(error) = daemon.import_test_image() {
        let _ = daemon.stop();
        return Err(error.context("importing the test image"));
    }
    println!("CONTAINERD_ADDRESS={}", daemon.address().display());
    println!("CONTAINERD_NAMESPACE={NAMESPACE}");
    println!("HUSK_E2E_IMAGE={IMAGE}");
    println!("HUSK_E2E_CONTAINERD_PID={}", daemon.pid());
    println!("HUSK_E2E_CONTAINERD_LOG={}", daemon.log_path().display());
    println!("HUSK_E2E_HUSK_CONFIG={}", options.husk_config.display());
    // Leave it running for `down`.
    std::mem::forget(daemon);
    Ok(ExitCode::SUCCESS)
}

fn down(dir: &Path) -> Result<ExitCode> {
    if !dir.exists() {
        return Ok(ExitCode::SUCCESS);
    }
    let mut daemon = PrivateContainerd::attach(dir)?;
    let forced = daemon.stop()?;
    for line in &forced {
        println!("e2e_env down: {line}");
    }
    Ok(if forced.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
