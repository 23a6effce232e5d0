//! What a test container is made of, host side: a busybox rootfs tree, and
//! the OCI spec and process JSON the agent takes (the agent replaces
//! `root.path` with the rootfs it was given in the share).
//!
//! One spec serves the host tier and the guest tier: busybox on `PATH`,
//! the usual kernel filesystems and a private `/tmp`, and its own pid,
//! network, ipc, uts and mount namespaces. Checks change it as JSON.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// The hostname every test container gets.
pub const CONTAINER_HOSTNAME: &str = "husk-container";

/// Builds a busybox rootfs at `rootfs`: `/bin/busybox` with every applet it
/// lists as a symlink, and the directories the spec mounts over.
pub fn build_busybox_rootfs(busybox: &Path, rootfs: &Path) -> Result<()> {
    for dir in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        let path = rootfs.join(dir);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    let target = rootfs.join("bin/busybox");
    std::fs::copy(busybox, &target)
        .with_context(|| format!("cannot copy {} to {}", busybox.display(), target.display()))?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {} --list", busybox.display()))?;
    ensure!(
        list.status.success(),
        "{} --list failed: {}",
        busybox.display(),
        list.status
    );
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = rootfs.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &link)
            .with_context(|| format!("cannot create the applet link {}", link.display()))?;
    }
    Ok(())
}

/// The `process` object of an OCI spec running `args` as root, on a
/// terminal if `terminal`.
pub fn process_json(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "HOME=/", "TERM=xterm"],
        "cwd": "/",
        "noNewPrivileges": true
    })
}

/// A minimal OCI spec for a busybox container running `args` (on a
/// terminal if `terminal`).
pub fn container_spec(args: &[&str], terminal: bool) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process_json(args, terminal),
        "root": {"path": "rootfs"},
        "hostname": CONTAINER_HOSTNAME,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_runs_the_args_on_a_terminal_only_when_asked() {
        let spec = container_spec(&["sh", "-c", "true"], false);
        assert_eq!(spec["process"]["args"], json!(["sh", "-c", "true"]));
        assert_eq!(spec["process"]["terminal"], false);
        assert_eq!(spec["hostname"], CONTAINER_HOSTNAME);
        assert_eq!(container_spec(&["sh"], true)["process"]["terminal"], true);
        assert_eq!(process_json(&["true"], false)["args"], json!(["true"]));
    }

    #[test]
    fn a_busybox_rootfs_links_every_applet_to_busybox() {
        let busybox = crate::artifacts::busybox().unwrap();
        let dir = crate::tempdir::TestDir::new("rootfs").unwrap();
        let rootfs = dir.join("rootfs");
        build_busybox_rootfs(&busybox, &rootfs).unwrap();
        for applet in ["sh", "cat", "sleep"] {
            let link = rootfs.join("bin").join(applet);
            assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("busybox"));
        }
        for dir in ["proc", "dev", "sys", "tmp", "etc"] {
            assert!(rootfs.join(dir).is_dir(), "{dir}");
        }
    }
}
