//! One sandbox VM for the guest tier and the bench: QEMU (`-M microvm`,
//! the accelerator `husk_vmm::qemu` picks) with the product kernel and an
//! initramfs holding only the static agent, our vsock and virtio-fs device
//! models served over vhost-user from threads of this process, and the
//! agent client connected over hybrid vsock.
//!
//! [`GuestSandbox::boot`] brings it up to a created sandbox (the share
//! mounted in the guest); containers get busybox rootfs trees bind-mounted
//! into the share with [`SharedDirectory::add_container`].
//! [`GuestSandbox::shut_down`] sends `DestroySandbox`, waits for QEMU to
//! exit, stops the servers, removes the work directory and reports what, if
//! anything, it found left on the host. Dropping a sandbox that was not shut
//! down stops everything the hard way.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use husk_agent_client::agent::{CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest};
use husk_agent_client::{AgentClient, Endpoint, ExitStatus};
use husk_devices::fs::{self as virtio_fs, FsConfig};
use husk_devices::vsock::{self as virtio_vsock, VsockConfig};
use husk_shim::resources::SharedDirectory;
use husk_vmm::qemu::{AccelChoice, GuestEnd, QemuVm, QemuVmConfig};

use crate::artifacts::{self, GuestKernel};
use crate::container::{
    build_busybox_rootfs, container_spec, process_json, rootfs_source, HostStdio, Pipes,
};

/// The guest's vsock context id (the first one not reserved).
pub const GUEST_CID: u64 = 3;
/// The virtio-fs tag of the share, as the shim names it.
pub const SHARED_FS_TAG: &str = "kataShared";
/// How long QEMU may take from start until the agent answers `Check`. A TCG
/// boot reaches init in about 1.5 s here; the margin covers a loaded host.
pub const AGENT_READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the guest may take to power off after `DestroySandbox`.
pub const POWER_OFF_DEADLINE: Duration = Duration::from_secs(60);
/// How long `RemoveContainer` lets a container's processes end.
const REMOVE_TIMEOUT_SECS: u32 = 10;

/// Distinguishes the sandboxes of one process.
static NEXT_SANDBOX: AtomicU32 = AtomicU32::new(0);

/// The shape of the VM.
#[derive(Debug, Clone, Copy)]
pub struct GuestShape {
    pub vcpus: u8,
    pub memory_mib: u32,
}

impl Default for GuestShape {
    fn default() -> Self {
        Self {
            vcpus: 2,
            memory_mib: 512,
        }
    }
}

/// What [`GuestSandbox::shut_down`] saw.
#[derive(Debug)]
pub struct Teardown {
    /// How the guest ended after `DestroySandbox`.
    pub guest_end: GuestEnd,
    /// `DestroySandbox`'s own answer (the guest may power off before the
    /// reply is read).
    pub destroy_reply: Result<(), String>,
    /// How long from `DestroySandbox` until QEMU had exited.
    pub destroy_to_exit: Duration,
    pub leftovers: Leftovers,
}

/// What a sandbox left on the host after it was shut down.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Processes whose command line names the sandbox's work directory (the
    /// QEMU process, if it survived).
    pub processes: Vec<u32>,
    /// Whether the QEMU process id still exists.
    pub qemu_alive: bool,
    /// Mount points under the work directory.
    pub mounts: Vec<String>,
    /// Whether the work directory (sockets, share, console) still exists.
    pub work_dir_exists: bool,
    /// vhost-user and vsock sockets still present.
    pub sockets: Vec<PathBuf>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

/// The host-side pieces of a running sandbox; dropping them stops them in
/// order (VM, servers, share mounts, directory).
struct Resources {
    work_dir: PathBuf,
    vm: Option<QemuVm>,
    vsock_server: Option<virtio_vsock::VhostUserServer>,
    fs_server: Option<virtio_fs::VhostUserServer>,
    shared: Option<SharedDirectory>,
}

impl Resources {
    fn release(&mut self) -> Option<GuestEnd> {
        let end = self.vm.take().map(QemuVm::stop);
        if let Some(server) = self.vsock_server.take() {
            server.stop();
        }
        if let Some(server) = self.fs_server.take() {
            if let Err(error) = server.stop() {
                eprintln!("the virtio-fs server had failed: {error}");
            }
        }
        // Unmounts every container rootfs bind mount.
        drop(self.shared.take());
        if self.work_dir.exists() {
            if let Err(error) = std::fs::remove_dir_all(&self.work_dir) {
                eprintln!("cannot remove {}: {error}", self.work_dir.display());
            }
        }
        end
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        self.release();
    }
}

/// A booted guest with a created sandbox; see the module documentation.
pub struct GuestSandbox {
    resources: Resources,
    client: AgentClient,
    sandbox_id: String,
    kernel: GuestKernel,
    busybox: PathBuf,
    console_log: PathBuf,
    qemu_pid: u32,
    accel: AccelChoice,
    boot_to_check: Duration,
}

impl GuestSandbox {
    /// Boots a guest and creates its sandbox. The time from starting QEMU
    /// until the agent answered `Check` is [`Self::boot_to_check`].
    pub async fn boot(shape: GuestShape) -> Result<Self> {
        let kernel = artifacts::guest_kernel()?;
        let initrd = artifacts::product_initramfs()?;
        let busybox = artifacts::busybox()?;

        let sequence = NEXT_SANDBOX.fetch_add(1, Ordering::Relaxed);
        let work_dir =
            std::env::temp_dir().join(format!("husk-agentguest-{}-{sequence}", std::process::id()));
        if work_dir.exists() {
            std::fs::remove_dir_all(&work_dir)
                .with_context(|| format!("cannot clear {}", work_dir.display()))?;
        }
        let share = work_dir.join("share");
        let qemu_work = work_dir.join("qemu");
        for dir in [&share, &qemu_work] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut resources = Resources {
            work_dir: work_dir.clone(),
            vm: None,
            vsock_server: None,
            fs_server: None,
            shared: None,
        };

        let vsock_vhost = work_dir.join("vsock-vhost.sock");
        let vsock_uds = work_dir.join("vsock.sock");
        let fs_vhost = work_dir.join("fs-vhost.sock");
        resources.vsock_server = Some(
            virtio_vsock::serve_vhost_user(
                &vsock_vhost,
                VsockConfig {
                    guest_cid: GUEST_CID,
                    uds_path: vsock_uds.clone(),
                },
            )
            .with_context(|| {
                format!("cannot serve vhost-user vsock on {}", vsock_vhost.display())
            })?,
        );
        let mut fs_config = FsConfig::new(&share);
        fs_config.tag = SHARED_FS_TAG.to_owned();
        resources.fs_server = Some(
            virtio_fs::serve_vhost_user(&fs_vhost, fs_config).with_context(|| {
                format!(
                    "cannot serve vhost-user virtio-fs on {}",
                    fs_vhost.display()
                )
            })?,
        );
        resources.shared = Some(
            SharedDirectory::open(&share)
                .with_context(|| format!("cannot open the share {}", share.display()))?,
        );

        let console_log = work_dir.join("console.log");
        let config = QemuVmConfig::new(&kernel.bzimage, &initrd, &console_log)
            .with_vcpus(shape.vcpus)
            .with_memory_mib(shape.memory_mib)
            .with_vsock(&vsock_vhost)
            .with_fs(&fs_vhost, SHARED_FS_TAG)
            .with_work_dir(&qemu_work);
        let started = Instant::now();
        let vm = QemuVm::start(config).context("QEMU did not start the sandbox VM")?;
        let qemu_pid = vm.pid();
        let accel = vm.accel().clone();
        resources.vm = Some(vm);

        let endpoint = Endpoint::HybridVsock {
            uds: vsock_uds.clone(),
        };
        // The outer timeout also bounds a handshake the device never answers.
        let connect = AgentClient::connect(endpoint, AGENT_READY_DEADLINE);
        let connected =
            tokio::time::timeout(AGENT_READY_DEADLINE + Duration::from_secs(5), connect)
                .await
                .map_err(|_| anyhow!("no answer to the hybrid vsock handshake"))
                .and_then(|result| result.map_err(anyhow::Error::from));
        let client = match connected {
            Ok(client) => client,
            Err(error) => {
                return Err(error).context(format!(
                    "the agent did not answer Check over {}; console:\n{}",
                    vsock_uds.display(),
                    console_tail(&console_log)
                ))
            }
        };
        let boot_to_check = started.elapsed();

        let sandbox_id = format!("agentguest-{}-{sequence}", std::process::id());
        client
            .create_sandbox(CreateSandboxRequest {
                sandbox_id: sandbox_id.clone(),
                hostname: "husk-sandbox".into(),
                shared_fs_tag: SHARED_FS_TAG.into(),
                ..Default::default()
            })
            .await
            .with_context(|| {
                format!(
                    "CreateSandbox {sandbox_id} failed; console:\n{}",
                    console_tail(&console_log)
                )
            })?;
        Ok(Self {
            resources,
            client,
            sandbox_id,
            kernel,
            busybox,
            console_log,
            qemu_pid,
            accel,
            boot_to_check,
        })
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    /// The release the guest kernel reports (from its bzImage header).
    pub fn kernel_release(&self) -> &str {
        &self.kernel.release
    }

    /// The accelerator QEMU runs with, and why.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    pub fn qemu_pid(&self) -> u32 {
        self.qemu_pid
    }

    /// From starting QEMU until the agent answered `Check`.
    pub fn boot_to_check(&self) -> Duration {
        self.boot_to_check
    }

    /// The sandbox's host work directory (share, sockets, console).
    pub fn work_dir(&self) -> &Path {
        &self.resources.work_dir
    }

    /// The end of the guest's console, for failure messages.
    pub fn console_tail(&self) -> String {
        console_tail(&self.console_log)
    }

    /// Builds a busybox rootfs for container `id`, bind-mounts it into the
    /// share and returns its path relative to the share.
    pub fn add_rootfs(&self, id: &str) -> Result<String> {
        let source = rootfs_source(&self.resources.work_dir, id);
        build_busybox_rootfs(&self.busybox, &source)?;
        let shared = self
            .resources
            .shared
            .as_ref()
            .context("the share is already closed")?;
        shared
            .add_container(id, &source)
            .with_context(|| format!("cannot add container {id}'s rootfs to the share"))?;
        let relative = SharedDirectory::rootfs_relative_path(id)
            .with_context(|| format!("container id {id:?}"))?;
        Ok(relative.to_string_lossy().into_owned())
    }

    /// Opens the host ends of the streams `pipes` asks for, named after
    /// `prefix`, and returns them with their ids.
    async fn open_streams(
        &self,
        prefix: &str,
        pipes: Pipes,
    ) -> Result<(husk_agent_client::agent::StdioStreams, HostStdio)> {
        let ids = pipes.stream_ids(prefix);
        let open = |id: String| async move {
            if id.is_empty() {
                Ok(None)
            } else {
                self.client
                    .open_stdio(&id)
                    .await
                    .map(Some)
                    .with_context(|| format!("cannot open stdio stream {id}"))
            }
        };
        let stdio = HostStdio {
            stdin: open(ids.stdin_id.clone()).await?,
            stdout: open(ids.stdout_id.clone()).await?,
            stderr: open(ids.stderr_id.clone()).await?,
        };
        Ok((ids, stdio))
    }

    /// Creates (does not start) container `id` running `args` in a fresh
    /// busybox rootfs.
    pub async fn create_container(
        &self,
        id: &str,
        args: &[&str],
        pipes: Pipes,
    ) -> Result<HostStdio> {
        let rootfs_path = self.add_rootfs(id)?;
        self.create_container_in(id, &rootfs_path, args, pipes)
            .await
    }

    /// Creates container `id` on a rootfs already in the share.
    pub async fn create_container_in(
        &self,
        id: &str,
        rootfs_path: &str,
        args: &[&str],
        pipes: Pipes,
    ) -> Result<HostStdio> {
        let (ids, stdio) = self.open_streams(id, pipes).await?;
        let request = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: container_spec(args).to_string().into_bytes(),
            rootfs_path: rootfs_path.into(),
            stdio: protobuf::MessageField::some(ids),
            ..Default::default()
        };
        self.client
            .create_container(request)
            .await
            .with_context(|| format!("CreateContainer {id} ({args:?})"))?;
        Ok(stdio)
    }

    /// Creates and starts container `id`.
    pub async fn run_container(&self, id: &str, args: &[&str], pipes: Pipes) -> Result<HostStdio> {
        let stdio = self.create_container(id, args, pipes).await?;
        self.client
            .start_container(id)
            .await
            .with_context(|| format!("StartContainer {id}"))?;
        Ok(stdio)
    }

    /// Starts `args` as process `exec_id` in the running container `id`.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        pipes: Pipes,
    ) -> Result<HostStdio> {
        let (ids, stdio) = self.open_streams(&format!("{id}-{exec_id}"), pipes).await?;
        let request = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: process_json(args).to_string().into_bytes(),
            stdio: protobuf::MessageField::some(ids),
            ..Default::default()
        };
        self.client
            .exec_process(request)
            .await
            .with_context(|| format!("ExecProcess {exec_id} in {id} ({args:?})"))?;
        Ok(stdio)
    }

    /// Waits for a process (the container's init when `exec_id` is empty).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        self.client
            .wait_process(id, exec_id)
            .await
            .with_context(|| format!("WaitProcess {id}/{exec_id:?}"))
    }

    /// Removes container `id` in the guest and its rootfs from the share.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        self.client
            .remove_container(id, REMOVE_TIMEOUT_SECS)
            .await
            .with_context(|| format!("RemoveContainer {id}"))?;
        if let Some(shared) = &self.resources.shared {
            shared
                .remove_container(id)
                .with_context(|| format!("cannot remove container {id}'s rootfs from the share"))?;
        }
        let source = rootfs_source(&self.resources.work_dir, id);
        std::fs::remove_dir_all(&source)
            .with_context(|| format!("cannot remove {}", source.display()))
    }

    /// Sends `DestroySandbox`, waits for the guest to power off, stops the
    /// servers, removes the work directory, and reports what is left.
    pub async fn shut_down(mut self) -> Result<Teardown> {
        let asked = Instant::now();
        let destroy_reply = self
            .client
            .destroy_sandbox(&self.sandbox_id)
            .await
            .map_err(|error| error.to_string());
        let vm = self
            .resources
            .vm
            .as_mut()
            .context("the sandbox VM was already stopped")?;
        let guest_end = tokio::task::block_in_place(|| vm.wait(POWER_OFF_DEADLINE));
        let destroy_to_exit = asked.elapsed();
        let console = self.console_tail();
        let guest_end = match guest_end {
            Some(end) => end,
            None => {
                self.resources.release();
                return Err(anyhow!(
                    "the guest was still running {POWER_OFF_DEADLINE:?} after DestroySandbox \
                     (reply: {destroy_reply:?}); console:\n{console}"
                ));
            }
        };
        let work_dir = self.resources.work_dir.clone();
        let sockets: Vec<PathBuf> = ["vsock-vhost.sock", "vsock.sock", "fs-vhost.sock"]
            .iter()
            .map(|name| work_dir.join(name))
            .collect();
        self.resources.release();
        let leftovers = Leftovers {
            processes: processes_mentioning(&work_dir),
            qemu_alive: Path::new(&format!("/proc/{}", self.qemu_pid)).exists(),
            mounts: mounts_under(&work_dir),
            work_dir_exists: work_dir.exists(),
            sockets: sockets.into_iter().filter(|s| s.exists()).collect(),
        };
        Ok(Teardown {
            guest_end,
            destroy_reply,
            destroy_to_exit,
            leftovers,
        })
    }
}

/// Sends the host's `tracing` output (our device servers log there) to
/// stderr, filtered by `RUST_LOG` (default: warnings and errors).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The last lines of a console log.
pub fn console_tail(path: &Path) -> String {
    const LINES: usize = 60;
    let text = std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|error| format!("(cannot read {}: {error})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// Processes whose command line mentions `path`.
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Mount points at or below `path` in this process's mount namespace, in
/// mount order.
pub fn mounts_under(path: &Path) -> Vec<String> {
    let prefix = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mount_point| {
            *mount_point == prefix || mount_point.starts_with(&format!("{prefix}/"))
        })
        .map(str::to_owned)
        .collect()
}
