//! What a test container is made of, host side: a busybox rootfs tree, the
//! OCI spec and process JSON the agent takes, and the host ends of a
//! process's stdio streams with the reads the checks need.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use husk_agent_client::agent::StdioStreams;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

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

/// The `process` object of an OCI spec running `args` as root.
pub fn process_json(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "HOME=/"],
        "cwd": "/",
        "noNewPrivileges": true
    })
}

/// A minimal OCI spec for a busybox container running `args`; the agent
/// replaces `root.path` with the rootfs in the share.
pub fn container_spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process_json(args),
        "root": {"path": "rootfs"},
        "hostname": "husk-container",
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

/// Which stdio pipes a process gets (no terminal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pipes {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Pipes {
    pub const NONE: Pipes = Pipes {
        stdin: false,
        stdout: false,
        stderr: false,
    };
    pub const OUT_ERR: Pipes = Pipes {
        stdin: false,
        stdout: true,
        stderr: true,
    };
    pub const ALL: Pipes = Pipes {
        stdin: true,
        stdout: true,
        stderr: true,
    };

    /// The stream ids for a process whose ids start with `prefix`.
    pub fn stream_ids(self, prefix: &str) -> StdioStreams {
        let name = |on: bool, pipe: &str| {
            if on {
                format!("{prefix}-{pipe}")
            } else {
                String::new()
            }
        };
        StdioStreams {
            stdin_id: name(self.stdin, "stdin"),
            stdout_id: name(self.stdout, "stdout"),
            stderr_id: name(self.stderr, "stderr"),
            terminal: false,
            ..Default::default()
        }
    }
}

/// The host ends of one process's stdio streams.
#[derive(Debug, Default)]
pub struct HostStdio {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
}

impl HostStdio {
    /// The stdout stream, which the process must have been given.
    pub fn take_stdout(&mut self) -> Result<UnixStream> {
        self.stdout
            .take()
            .context("the process was created without a stdout stream")
    }

    pub fn take_stderr(&mut self) -> Result<UnixStream> {
        self.stderr
            .take()
            .context("the process was created without a stderr stream")
    }

    pub fn take_stdin(&mut self) -> Result<UnixStream> {
        self.stdin
            .take()
            .context("the process was created without a stdin stream")
    }
}

/// Everything `stream` carries until end of file, within `timeout`.
pub async fn read_to_end(stream: &mut UnixStream, timeout: Duration) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    match tokio::time::timeout(timeout, stream.read_to_end(&mut data)).await {
        Ok(Ok(_)) => Ok(data),
        Ok(Err(error)) => Err(error).context("reading a stdio stream failed"),
        Err(_) => bail!(
            "a stdio stream did not reach end of file within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&data)
        ),
    }
}

/// Reads until `needle` has appeared (within `timeout`); returns all read.
pub async fn read_until(
    stream: &mut UnixStream,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut data = Vec::new();
    while !String::from_utf8_lossy(&data).contains(needle) {
        let mut buffer = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(read) => read.context("reading a stdio stream failed")?,
            Err(_) => bail!(
                "{needle:?} did not arrive within {timeout:?}; got {:?}",
                String::from_utf8_lossy(&data)
            ),
        };
        ensure!(
            n > 0,
            "end of file before {needle:?}; got {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8(data).context("a stdio stream carried text that is not UTF-8")
}

/// Like [`read_to_end`], as text.
pub async fn read_text(stream: &mut UnixStream, timeout: Duration) -> Result<String> {
    let data = read_to_end(stream, timeout).await?;
    String::from_utf8(data).context("a stdio stream carried text that is not UTF-8")
}

/// Where a container's rootfs source lives in a sandbox's work directory.
pub fn rootfs_source(work_dir: &Path, id: &str) -> PathBuf {
    work_dir.join("rootfs-src").join(id)
}
