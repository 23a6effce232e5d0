//! A private containerd for the e2e tier, `make demo` and `make bench`.
//!
//! [`PrivateContainerd::start`] runs Debian's containerd 1.6 with its own
//! config, root, state and sockets in one work directory (the CRI plugin
//! and the snapshotters this host has no use for disabled), a PATH that
//! finds `containerd-shim-kata-v2` in the shim directory (`$HUSK_SHIM_DIR`,
//! else `target/release`) before the system's `containerd-shim-runc-v2`,
//! and `HUSK_CONFIG` naming a test configuration derived from
//! `shim/configuration.toml` with the workspace's kernel and initramfs. It
//! waits until `ctr version` answers. The host's own containerd
//! (`/run/containerd`, `/var/lib/containerd`) is never used, although
//! containerd 1.6's shims put their sockets in `/run/containerd/s/`
//! whatever the daemon's address: [`Snapshot`] tells ours apart.
//!
//! [`PrivateContainerd::stop`] removes what is left in its namespace,
//! stops containerd, kills any shim it started, unmounts everything below
//! the work directory, removes the cgroups of the namespace and the work
//! directory, and reports what it had to clean up the hard way. The daemon
//! runs in its own session, so the `e2e_env` example can leave it running
//! between `up` and `down`; [`PrivateContainerd::attach`] finds it again.

use husk_shim::fault::FAULT_DIR_ENV;
use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use husk_test_support::artifacts::{guest_artifacts, run_rootfs_image_script, workspace_root};
use husk_test_support::host::{processes, Process};
use husk_test_support::mounts::mounts_under;

/// The runc runtime type (Debian's `containerd-shim-runc-v2`).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The runtime type of the test-only shim built with guest-reachable test
/// hooks (`make hooked-shim`: `containerd-shim-huskhooks-v2`).
pub const HOOKED_RUNTIME: &str = "io.containerd.huskhooks.v2";

/// Where `make hooked-shim` puts `containerd-shim-huskhooks-v2`
/// (`$HUSK_HOOKED_SHIM_DIR`, default `target/test-hooks/bin`); on the
/// private containerd's PATH after the shim directory.
pub fn hooked_shim_dir() -> PathBuf {
    std::env::var_os("HUSK_HOOKED_SHIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/test-hooks/bin"))
}

/// husk's runtime type (`containerd-shim-kata-v2`).
pub const HUSK_RUNTIME: &str = "io.containerd.kata.v2";
/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "husk-e2e";
/// The image `rootfs-image/mkociimage.py` builds, as imported.
pub const IMAGE: &str = "docker.io/husk/busybox:latest";
/// The same image with `User` 1000:1000 in its config.
pub const IMAGE_UID1000: &str = "docker.io/husk/busybox:uid1000";
/// The test image as a CRI sandbox (pause) image: `sleep infinity`.
pub const PAUSE_IMAGE: &str = "docker.io/husk/busybox:pause";
/// The namespace containerd's CRI plugin keeps its pods and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Where containerd 1.6 shims put their ttrpc sockets, whatever the daemon.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// The husk shim's state directory.
pub const HUSK_STATE_DIR: &str = "/run/husk";
/// How long containerd may take to answer after it starts.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long containerd may take to exit after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// The file in the work directory that records the daemon's pid.
const PID_FILE: &str = "containerd.pid";

/// A running private containerd.
#[derive(Debug)]
pub struct PrivateContainerd {
    dir: PathBuf,
    /// Changes when [`PrivateContainerd::restart`] starts a new daemon.
    pid: AtomicI32,
    /// Whether this process started it (and must reap it).
    child: bool,
    stopped: bool,
}

/// The directory of crash triggers inside the daemon's directory.
const FAULTS_DIR: &str = "faults";

/// What the daemon gets.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory holding `containerd-shim-kata-v2`, first on the PATH.
    pub shim_dir: PathBuf,
    /// The husk configuration named by `HUSK_CONFIG` in containerd's (and
    /// so the shims') environment.
    pub husk_config: PathBuf,
    /// Enable containerd's CRI plugin (kubelet's API), with the `runc` and
    /// `kata` runtime handlers and [`cri_network`]'s CNI bridge.
    pub cri: bool,
}

impl Options {
    /// The shim directory from `$HUSK_SHIM_DIR` (default `target/release`)
    /// and a test configuration written to `dir/husk-configuration.toml`.
    pub fn for_tests(dir: &Path) -> Result<Self> {
        let shim_dir = std::env::var_os("HUSK_SHIM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/release"));
        let husk_config = dir.join("husk-configuration.toml");
        write_file(&husk_config, &test_husk_config(&[])?)?;
        Ok(Self {
            shim_dir,
            husk_config,
            cri: false,
        })
    }
}

/// A husk configuration for the tests: `shim/configuration.toml` with the
/// workspace's guest artifacts, `kind = "auto"`, a 60 s agent deadline
/// (TCG boots take seconds), then `overrides` (`(key, TOML value)` pairs
/// replacing the line that sets `key`).
pub fn test_husk_config(overrides: &[(&str, String)]) -> Result<String> {
    let template_path = workspace_root().join("shim/configuration.toml");
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("cannot read {}", template_path.display()))?;
    let mut settings: Vec<(&str, String)> = guest_artifacts()
        .iter()
        .map(|(key, path)| (*key, toml_string(&path.to_string_lossy())))
        .collect();
    settings.push(("kind", toml_string("auto")));
    settings.push(("agent_ready_ms", "60000".to_owned()));
    settings.extend(overrides.iter().cloned());
    let mut text = String::new();
    let mut applied = BTreeSet::new();
    for line in template.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        // The last setting of a key wins, so overrides beat the defaults.
        match settings.iter().rev().find(|(k, _)| *k == key) {
            Some((k, value)) if !line.trim_start().starts_with('#') => {
                text.push_str(&format!("{k} = {value}\n"));
                applied.insert(*k);
            }
            _ => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    for (key, _) in &settings {
        ensure!(
            applied.contains(key),
            "{} has no `{key} = ` line to set",
            template_path.display()
        );
    }
    Ok(text)
}

/// A TOML basic string.
pub fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

impl PrivateContainerd {
    /// Starts containerd in `dir` (created if needed) and waits until it
    /// answers.
    pub fn start(dir: &Path, options: &Options) -> Result<Self> {
        for tool in ["containerd", "ctr"] {
            ensure!(
                find_on_path(tool).is_some(),
                "{tool} is missing: apt-get install containerd (or make deps)"
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let address = dir.join("containerd.sock");
        ensure!(
            address.as_os_str().len() < 100,
            "the socket path {} is too long for a Unix socket; use a shorter work directory",
            address.display()
        );
        let pid = spawn_daemon(&dir, options)?;
        let mut daemon = Self {
            dir,
            pid: AtomicI32::new(pid),
            child: true,
            stopped: false,
        };
        if let Err(error) = daemon.wait_ready() {
            let tail = daemon.log_tail(30);
            let _ = daemon.stop();
            return Err(error.context(format!("containerd's log ends:\n{tail}")));
        }
        Ok(daemon)
    }

    /// Finds the daemon a previous `start` left running in `dir`.
    pub fn attach(dir: &Path) -> Result<Self> {
        let pid_file = dir.join(PID_FILE);
        let text = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("no private containerd in {}", dir.display()))?;
        let pid: i32 = text
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", pid_file.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            pid: AtomicI32::new(pid),
            child: false,
            stopped: false,
        })
    }

    fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            if !self.alive() {
                bail!("containerd exited while starting");
            }
            let out = self.ctr().arg("version").output();
            if matches!(&out, Ok(out) if out.status.success()) {
                return Ok(());
            }
            if started.elapsed() > READY_DEADLINE {
                bail!(
                    "containerd did not answer `ctr version` within {:?}",
                    READY_DEADLINE
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts containerd as an operator would (SIGTERM, then a new
    /// daemon on the same root, state and sockets), leaving its shims
    /// running: the new daemon must find them through their `address`
    /// files.
    pub fn restart(&self, options: &Options) -> Result<()> {
        ensure!(
            self.child,
            "only a daemon this process started can be restarted"
        );
        // SAFETY: plain signal to a pid we started.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let started = Instant::now();
        while self.alive() {
            ensure!(
                started.elapsed() < STOP_DEADLINE,
                "containerd (pid {}) ignored SIGTERM for {STOP_DEADLINE:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = spawn_daemon(&self.dir, options)?;
        self.pid.store(pid, Ordering::Relaxed);
        self.wait_ready()
    }

    /// The work directory.
    /// Where the fault tests put the shim's crash triggers
    /// (`husk_shim::fault`): `kill-at-<step>` files.
    pub fn fault_dir(&self) -> PathBuf {
        self.dir.join(FAULTS_DIR)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's pid.
    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// containerd's root directory.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// containerd's state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// containerd's log (the shims' stderr lands there too).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `ctr` bound to this daemon and the tests' namespace.
    pub fn ctr(&self) -> Command {
        self.ctr_in(NAMESPACE)
    }

    /// `ctr` bound to this daemon and `namespace`.
    pub fn ctr_in(&self, namespace: &str) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.address())
            .arg("--namespace")
            .arg(namespace);
        command
    }

    /// Builds the test image with `rootfs-image/mkociimage.py` into the
    /// work directory and imports it.
    pub fn import_test_image(&self) -> Result<()> {
        self.import_test_image_into(NAMESPACE)
    }

    /// [`Self::import_test_image`] into `namespace` (the CRI plugin's is
    /// [`CRI_NAMESPACE`]).
    pub fn import_test_image_into(&self, namespace: &str) -> Result<()> {
        let archive = self.dir.join("husk-busybox-oci.tar");
        if !archive.exists() {
            run_rootfs_image_script("mkociimage.py", [&archive])?;
        }
        let ctr = || self.ctr_in(namespace);
        let imported = run_with_timeout(
            ctr().args(["images", "import"]).arg(&archive),
            Duration::from_secs(120),
        )?;
        ensure!(
            imported.status.success(),
            "ctr images import failed ({}): {}",
            imported.status,
            String::from_utf8_lossy(&imported.stderr).trim()
        );
        let listed = run_with_timeout(ctr().args(["images", "ls", "-q"]), Duration::from_secs(30))?;
        let names = String::from_utf8_lossy(&listed.stdout).into_owned();
        for image in [IMAGE, IMAGE_UID1000, PAUSE_IMAGE] {
            ensure!(
                names.lines().any(|line| line.trim() == image),
                "the import registered no {image}; `ctr images ls -q` says: {names}"
            );
        }
        Ok(())
    }

    /// Whether the daemon still runs.
    pub fn alive(&self) -> bool {
        if self.child {
            // Reap it if it exited, so a zombie does not count as alive.
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let reaped = unsafe { libc::waitpid(self.pid(), &mut status, libc::WNOHANG) };
            if reaped == self.pid() {
                return false;
            }
        }
        Path::new(&format!("/proc/{}", self.pid())).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .map(|stat| stat.contains(") Z "))
                .unwrap_or(true)
    }

    /// Shim processes this daemon started (their `-address` is ours).
    pub fn shim_processes(&self) -> Vec<Process> {
        let address = self.address().to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|p| {
                p.args
                    .first()
                    .is_some_and(|a| a.contains("containerd-shim"))
                    && p.args.iter().any(|a| a == &address)
            })
            .collect()
    }

    /// Stops everything: the namespace's tasks and containers, containerd,
    /// any shim left, mounts below the work directory, the namespace's
    /// cgroups and the work directory. Says what needed force.
    pub fn stop(&mut self) -> Result<Vec<String>> {
        if self.stopped {
            return Ok(Vec::new());
        }
        self.stopped = true;
        let mut forced = Vec::new();
        if self.alive() {
            forced.extend(self.remove_everything_in_namespace());
            // SAFETY: plain signal to a pid we started.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let started = Instant::now();
            while self.alive() && started.elapsed() < STOP_DEADLINE {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.alive() {
                forced.push(format!(
                    "containerd (pid {}) ignored SIGTERM for {:?}; killed",
                    self.pid(),
                    STOP_DEADLINE
                ));
                // SAFETY: as above.
                unsafe { libc::kill(self.pid(), libc::SIGKILL) };
                while self.alive() && started.elapsed() < STOP_DEADLINE * 2 {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for shim in self.shim_processes() {
            forced.push(format!("killed a leftover shim: {shim}"));
            // SAFETY: plain signal to a shim our daemon started.
            unsafe { libc::kill(shim.pid as i32, libc::SIGKILL) };
        }
        for mount_point in mounts_under(&self.dir).into_iter().rev() {
            forced.push(format!("unmounted {mount_point}"));
            let target = std::ffi::CString::new(mount_point.as_bytes())
                .context("mount point with a NUL byte")?;
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        remove_namespace_cgroups();
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("cannot remove {}", self.dir.display()))?;
        Ok(forced)
    }

    /// Kills and deletes the namespace's tasks, removes its containers;
    /// one line per thing that was still there.
    fn remove_everything_in_namespace(&self) -> Vec<String> {
        let mut found = Vec::new();
        let list = |what: &str| -> Vec<String> {
            run_with_timeout(self.ctr().args([what, "ls", "-q"]), Duration::from_secs(30))
                .map(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        for task in list("tasks") {
            found.push(format!("task {task} was still there"));
            let _ = run_with_timeout(
                self.ctr()
                    .args(["tasks", "kill", "-a", "-s", "SIGKILL", &task]),
                Duration::from_secs(30),
            );
            let _ = run_with_timeout(
                self.ctr().args(["tasks", "delete", "-f", &task]),
                Duration::from_secs(60),
            );
        }
        for container in list("containers") {
            found.push(format!("container {container} was still there"));
            let _ = run_with_timeout(
                self.ctr().args(["containers", "rm", &container]),
                Duration::from_secs(60),
            );
        }
        found
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if self.child && !self.stopped {
            if let Err(error) = self.stop() {
                eprintln!("stopping the private containerd: {error:#}");
            }
        }
    }
}

/// The CNI network the CRI plugin of a private containerd gives its pods:
/// a bridge on a private subnet, host-local addresses.
pub mod cri_network {
    /// The bridge CNI makes on the host (removed when the daemon stops).
    pub const BRIDGE: &str = "huskcri0";
    /// The pods' subnet.
    pub const SUBNET: &str = "10.213.0.0/24";
    /// The bridge's address, the pods' gateway.
    pub const GATEWAY: &str = "10.213.0.1";
    /// The network's name in its conflist.
    pub const NAME: &str = "husk-cri-test";
}

/// The CNI conflist for [`cri_network`], its IPAM state in `ipam_dir`.
fn cni_conflist(ipam_dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "{name}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{subnet}", "gateway": "{gateway}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}],
        "dataDir": "{ipam}"
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#,
        name = cri_network::NAME,
        bridge = cri_network::BRIDGE,
        subnet = cri_network::SUBNET,
        gateway = cri_network::GATEWAY,
        ipam = ipam_dir.display(),
    )
}

/// The CRI plugin's section: images and sandboxes from the local store
/// only (the pause image is the test image's `pause` tag), the `runc` and
/// `kata` handlers, CNI from Debian's plugins in `/usr/lib/cni`.
fn cri_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # kubelet's -998 for sandboxes needs CAP_SYS_RESOURCE, which a test host
  # in a container may lack: never below containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
      runtime_type = "{HUSK_RUNTIME}"
      pod_annotations = ["io.katacontainers.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#
    )
}

fn containerd_config(dir: &Path, cri: bool) -> String {
    let d = dir.display();
    let cri_disabled = if cri {
        ""
    } else {
        "\n  \"io.containerd.grpc.v1.cri\","
    };
    let cri_section = if cri { cri_config(dir) } else { String::new() };
    format!(
        r#"# husk e2e: a private containerd; nothing here is the host's.
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{cri_disabled}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "info"

[metrics]
  address = ""
{cri_section}"#
    )
}

/// Removes the (empty) cgroups runc created for the tests' namespace.
fn remove_namespace_cgroups() {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut candidates = vec![PathBuf::from("/sys/fs/cgroup").join(NAMESPACE)];
    candidates.extend(
        controllers
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.path().join(NAMESPACE)),
    );
    for dir in candidates {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Whether `tool` is on this process's PATH.
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|candidate| candidate.is_file())
    })
}

/// The names in a directory (empty if it does not exist).
pub fn entries_of(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The paths (relative to `dir`) of its entries down to `depth` levels
/// (`/run/husk/sandboxes/<id>/share` at depth 3), not following symlinks.
pub fn entries_to_depth(dir: &Path, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![(PathBuf::new(), 1)];
    while let Some((relative, level)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(dir.join(&relative)) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = relative.join(entry.file_name());
            if level < depth && entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push((path.clone(), level + 1));
            }
            found.insert(path.to_string_lossy().into_owned());
        }
    }
    found
}

/// What exists on the host before the suite, so its leftovers stand out
/// from other users' (another test's pods, a developer's shim): shim
/// sockets in `/run/containerd/s`, entries of `/run/husk` and mounts below
/// it, and QEMU processes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub shim_sockets: BTreeSet<String>,
    pub husk_state: BTreeSet<String>,
    pub husk_mounts: BTreeSet<String>,
    pub qemu_pids: BTreeSet<u32>,
}

impl Snapshot {
    pub fn take() -> Self {
        Self {
            shim_sockets: entries_of(Path::new(SHIM_SOCKET_DIR)),
            husk_state: entries_to_depth(Path::new(HUSK_STATE_DIR), 3),
            husk_mounts: mounts_under(Path::new(HUSK_STATE_DIR))
                .into_iter()
                .collect(),
            qemu_pids: qemu_processes().iter().map(|p| p.pid).collect(),
        }
    }
}

/// QEMU processes on the host.
pub fn qemu_processes() -> Vec<Process> {
    processes()
        .into_iter()
        .filter(|p| {
            p.args.first().is_some_and(|a| {
                Path::new(a)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"))
            })
        })
        .collect()
}

/// What the daemon's shims left behind compared with `before`: shim
/// processes, QEMU processes that are new and are a shim's children,
/// orphans, or name `/run/husk`, mounts under the work directory or
/// `/run/husk`, new shim sockets, new entries of `/run/husk` (its
/// sockets and share directories).
pub fn leftovers(daemon: &PrivateContainerd, before: &Snapshot) -> Vec<String> {
    let mut found = Vec::new();
    let shims = daemon.shim_processes();
    let shim_pids: BTreeSet<u32> = shims.iter().map(|p| p.pid).collect();
    for shim in &shims {
        found.push(format!("shim process {shim}"));
    }
    for qemu in qemu_processes() {
        let ours = shim_pids.contains(&qemu.ppid)
            || qemu.ppid == 1
            || qemu.args.iter().any(|a| a.contains(HUSK_STATE_DIR));
        if !before.qemu_pids.contains(&qemu.pid) && ours {
            found.push(format!("qemu process {qemu}"));
        }
    }
    for dir in [daemon.root(), daemon.state(), PathBuf::from(HUSK_STATE_DIR)] {
        for mount_point in mounts_under(&dir) {
            if !before.husk_mounts.contains(&mount_point) {
                found.push(format!("mount {mount_point}"));
            }
        }
    }
    for name in entries_of(Path::new(SHIM_SOCKET_DIR)).difference(&before.shim_sockets) {
        found.push(format!("shim socket {SHIM_SOCKET_DIR}/{name}"));
    }
    for name in entries_to_depth(Path::new(HUSK_STATE_DIR), 3).difference(&before.husk_state) {
        // The roots of the sandbox and VM directories are made once per
        // host (as /run/containerd is); only what is in them belongs to a
        // pod.
        let path = Path::new(HUSK_STATE_DIR).join(name);
        let empty_root = (name == "sandboxes" || name == "vm") && entries_of(&path).is_empty();
        if !empty_root {
            found.push(format!("husk state {HUSK_STATE_DIR}/{name}"));
        }
    }
    let bundles = daemon
        .state()
        .join("io.containerd.runtime.v2.task")
        .join(NAMESPACE);
    for name in entries_of(&bundles) {
        found.push(format!("bundle {}/{name}", bundles.display()));
    }
    found
}

/// Runs `command` with its output captured, killing it after `timeout`.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    run_with_input(command, None, timeout)
}

/// Like [`run_with_timeout`], writing `input` to its stdin first (stdin is
/// /dev/null without input).
pub fn run_with_input(
    command: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    let shown = format!("{command:?}");
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        let _ = stdin.write_all(input);
    }
    let reader = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = reader(Box::new(child.stdout.take().context("no stdout pipe")?));
    let stderr = reader(Box::new(child.stderr.take().context("no stderr pipe")?));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("waitpid")? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Starts a containerd process for `dir` (config, log, pid file).
fn spawn_daemon(dir: &Path, options: &Options) -> Result<i32> {
    let config = dir.join("config.toml");
    write_file(&config, &containerd_config(dir, options.cri))?;
    if options.cri {
        let net_d = dir.join("cni/net.d");
        std::fs::create_dir_all(&net_d)
            .with_context(|| format!("cannot create {}", net_d.display()))?;
        write_file(
            &net_d.join("10-husk-cri.conflist"),
            &cni_conflist(&dir.join("cni/ipam")),
        )?;
    }
    let log_path = dir.join("containerd.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let log_err = log.try_clone().context("cannot duplicate the log file")?;
    let path = format!(
        "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        options.shim_dir.display(),
        hooked_shim_dir().display()
    );
    let mut command = Command::new("containerd");
    command
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", path)
        .env("HUSK_CONFIG", &options.husk_config)
        .env(FAULT_DIR_ENV, dir.join(FAULTS_DIR))
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Ok(log_level) = std::env::var("RUST_LOG") {
        command.env("RUST_LOG", log_level);
    }
    // Its own session: a `ctr` or terminal signal to our process group
    // never reaches it, and it outlives the `e2e_env up` process.
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().context("cannot start containerd")?;
    let pid = child.id() as i32;
    // The Child handle is dropped; `stop` reaps the pid with waitpid.
    drop(child);
    write_file(&dir.join(PID_FILE), &format!("{pid}\n"))?;
    Ok(pid)
}
