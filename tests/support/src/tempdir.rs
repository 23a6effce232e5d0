//! One test directory type: a fresh directory per test, named after the
//! test and this process (`husk-<name>-<pid>-<n>`, canonical, short, because Unix
//! socket paths inside it are limited to 108 bytes), removed on drop.
//!
//! A directory with something still mounted below it is not removed:
//! deleting through a bind mount would delete the host files behind it.
//! The drop says so instead, and the mount shows up in the leak checks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::mounts::mounts_under;

/// Distinguishes the test directories of one process.
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A directory for one test, removed on drop; see the module documentation.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory in the system's temporary directory.
    pub fn new(name: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// A fresh directory in `parent`. One left by an earlier process with
    /// the same pid is cleared first.
    pub fn new_in(parent: &Path, name: &str) -> Result<Self> {
        let sequence = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("husk-{name}-{}-{sequence}", std::process::id()));
        if path.exists() {
            remove_unless_mounted(&path)
                .with_context(|| format!("cannot clear the stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // Canonical, so paths built from it match what the kernel reports
        // (mountinfo, /proc/self/fd) even when TMPDIR goes through a symlink.
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Err(error) = remove_unless_mounted(&self.path) {
            eprintln!("{error:#}");
        }
    }
}

/// Removes `path` with everything in it, unless something is mounted at or
/// below it.
fn remove_unless_mounted(path: &Path) -> Result<()> {
    let mounts = mounts_under(path);
    anyhow::ensure!(
        mounts.is_empty(),
        "not removing {}: mounts remain below it: {mounts:?}",
        path.display()
    );
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_test_dir_is_fresh_and_gone_after_drop() {
        let first = TestDir::new("unit").unwrap();
        let second = TestDir::new("unit").unwrap();
        assert_ne!(first.path(), second.path());
        std::fs::write(first.join("file"), "x").unwrap();
        let path = first.path().to_path_buf();
        assert!(path.is_dir());
        drop(first);
        assert!(!path.exists(), "{} is left", path.display());
    }
}
