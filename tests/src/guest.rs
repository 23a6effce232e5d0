//! One sandbox VM for the guest tier and the agent bench, booted through
//! the shim's own code: [`Sandbox::boot`] with the product launcher and a
//! [`VmSpec`] for the `qemu` backend, so the suites run the same device
//! servers, QEMU command line, agent connect and `CreateSandbox` as a pod.
//! The guest is the product kernel with an initramfs holding only the
//! freshly built static agent.
//!
//! Containers get busybox rootfs trees bind-mounted into the sandbox's
//! share ([`GuestSandbox::add_rootfs`]). [`GuestSandbox::shut_down`] sends
//! `DestroySandbox`, waits for the guest to power itself off, lets
//! [`Sandbox::destroy`] tear the host side down, and reports how the VM
//! ended and what, if anything, it found left on the host. Dropping a
//! sandbox that was not shut down stops everything the hard way.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_agent_client::{AgentClient, ExitStatus};
use husk_shim::config::{Config, HypervisorKind, VmSize};
use husk_shim::hypervisor::{Backend, BackendLauncher, ExitWatcher, VmInfo, VmSpec};
use husk_shim::paths::SandboxPaths;
use husk_shim::resources::cleanup;
use husk_shim::resources::SharedDirectory;
use husk_shim::sandbox::{console_tail, BootRequest, Sandbox};
use husk_test_support::artifacts::{self, GuestKernel};
use husk_test_support::bundle::{build_busybox_rootfs, container_spec};
use husk_test_support::host::{process_exists, processes_mentioning, sockets_under};
use husk_test_support::mounts::mounts_under;
use husk_test_support::stdio::{HostStdio, Pipes};
use serde_json::Value;

/// How long the agent may take to answer `Check` after the VM starts. A
/// TCG boot reaches init in about 1.5 s here; the margin covers a loaded
/// host.
pub const AGENT_READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the guest may take to power off after `DestroySandbox`.
pub const POWER_OFF_DEADLINE: Duration = Duration::from_secs(60);
/// How long `RemoveContainer` lets a container's processes end.
const REMOVE_TIMEOUT_SECS: u32 = 10;
/// The hostname the sandbox is created with.
const SANDBOX_HOSTNAME: &str = "husk-sandbox";

/// The guest the suites boot unless they ask for another.
pub const DEFAULT_SIZE: VmSize = VmSize {
    vcpus: 2,
    memory_mib: 512,
};

/// Distinguishes the sandboxes of one process.
static NEXT_SANDBOX: AtomicU32 = AtomicU32::new(0);

/// What [`GuestSandbox::shut_down`] saw.
#[derive(Debug)]
pub struct Teardown {
    /// The guest's answer to `DestroySandbox` (it may power off before the
    /// reply is read).
    pub destroy_reply: Result<(), String>,
    /// How long from `DestroySandbox` until the QEMU process had exited.
    pub destroy_to_exit: Duration,
    /// How the VM ended, as [`Sandbox::destroy`] reports it (a QEMU
    /// `GuestEnd`, e.g. `PoweredOff`).
    pub vm_end: String,
    pub leftovers: Leftovers,
}

/// What a sandbox left on the host after it was shut down.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Processes whose command line names the sandbox's private root (the
    /// QEMU process, if it survived).
    pub processes: Vec<u32>,
    /// Whether the QEMU process id still exists.
    pub qemu_alive: bool,
    /// Mount points under the sandbox's directory.
    pub mounts: Vec<String>,
    /// Whether the sandbox's private root (its sandbox directory with the
    /// share and console, its VM directory with the sockets) still exists.
    pub work_dir_exists: bool,
    /// Unix sockets (vhost-user, hybrid vsock) still below it.
    pub sockets: Vec<PathBuf>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

/// A booted guest with a created sandbox; see the module documentation.
pub struct GuestSandbox {
    /// `None` once shut down.
    sandbox: Option<Sandbox>,
    /// Resolves when QEMU exits; taken by the shutdown.
    vm_exit: Mutex<Option<ExitWatcher>>,
    kernel: GuestKernel,
    busybox: PathBuf,
    /// The private root holding `sandboxes/<id>` and `vm/<digest>`.
    holder: PathBuf,
}

/// The shim configuration the guest suites boot with: the `qemu` backend
/// on the product kernel and the given initramfs, the agent deadline of
/// [`AGENT_READY_DEADLINE`], everything else the built-in default.
fn guest_config(kernel: &GuestKernel, initrd: &Path) -> Config {
    let mut config = Config::default();
    config.hypervisor.kind = HypervisorKind::Qemu;
    config.hypervisor.qemu_kernel = kernel.bzimage.clone();
    config.hypervisor.initrd = initrd.to_owned();
    config.timeouts.agent_ready_ms = AGENT_READY_DEADLINE.as_millis() as u64;
    config
}

impl GuestSandbox {
    /// Boots a guest of `size` and creates its sandbox.
    pub async fn boot(size: VmSize) -> Result<Self> {
        Self::boot_with(size, |_| {}).await
    }

    /// [`Self::boot`] with the suite's configuration changed by `adjust`
    /// (smaller limits for the hostile-guest tier, say).
    pub async fn boot_with(size: VmSize, adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        let kernel = artifacts::guest_kernel()?;
        let initrd = artifacts::product_initramfs()?;
        let busybox = artifacts::busybox()?;
        let mut config = guest_config(&kernel, &initrd);
        adjust(&mut config);

        let sequence = NEXT_SANDBOX.fetch_add(1, Ordering::Relaxed);
        let sandbox_id = format!("agentguest-{}-{sequence}", std::process::id());
        // A private root beside the system's temporary files, holding the
        // sandbox directory and the VM directory beside it.
        let holder = std::env::temp_dir().join(format!("husk-{sandbox_id}"));
        let paths = SandboxPaths::under(&holder.join("sandboxes"), &sandbox_id);
        let spec = VmSpec::for_pod(
            &config,
            None,
            Backend::Qemu,
            size,
            &paths.vm_dir,
            &paths.console_log(),
        )?;
        let request = BootRequest {
            sandbox_id: &sandbox_id,
            config: &config,
            spec,
            hostname: SANDBOX_HOSTNAME,
            paths,
            // The test process stays in its own cgroup.
            cgroup: None,
            // Loopback only: the guest tier has no CNI.
            netns: None,
            labels: Default::default(),
        };
        let booted = Sandbox::boot(&BackendLauncher, request)
            .await
            .with_context(|| format!("sandbox {sandbox_id} did not boot"));
        let (sandbox, vm_exit) = match booted {
            Ok(booted) => booted,
            Err(error) => {
                remove_holder(&holder);
                return Err(error);
            }
        };
        Ok(Self {
            sandbox: Some(sandbox),
            vm_exit: Mutex::new(Some(vm_exit)),
            kernel,
            busybox,
            holder,
        })
    }

    fn sandbox(&self) -> &Sandbox {
        // Only `shut_down` (which consumes self) and drop take it.
        self.sandbox
            .as_ref()
            .expect("a GuestSandbox holds its sandbox until it is shut down")
    }

    /// The pod's share, as the shim manages it.
    pub fn share(&self) -> &std::sync::Arc<SharedDirectory> {
        self.sandbox().share()
    }

    /// The sandbox's host directory (share, console, sockets).
    pub fn sandbox_dir(&self) -> &Path {
        &self.sandbox().paths.dir
    }

    /// Where container `id`'s rootfs is built on the host.
    pub fn rootfs_source_of(&self, id: &str) -> PathBuf {
        self.rootfs_source(id)
    }

    pub fn client(&self) -> &AgentClient {
        &self.sandbox().client
    }

    pub fn sandbox_id(&self) -> &str {
        &self.sandbox().id
    }

    /// The release the guest kernel reports (from its bzImage header).
    pub fn kernel_release(&self) -> &str {
        &self.kernel.release
    }

    /// The VM: backend, accelerator and why, the QEMU process id.
    pub fn vm(&self) -> &VmInfo {
        &self.sandbox().description
    }

    /// From launching the VM until the agent answered `Check`.
    pub fn agent_ready_after(&self) -> Duration {
        self.sandbox().agent_ready_after
    }

    /// The sandbox's host directory (share, sockets, console).
    pub fn work_dir(&self) -> &Path {
        &self.sandbox().paths.dir
    }

    /// The end of the guest's console, for failure messages.
    pub fn console_tail(&self) -> String {
        console_tail(&self.sandbox().paths)
    }

    /// Where container `id`'s rootfs tree is built before it is
    /// bind-mounted into the share.
    fn rootfs_source(&self, id: &str) -> PathBuf {
        self.work_dir().join("rootfs-src").join(id)
    }

    /// Builds a busybox rootfs for container `id`, bind-mounts it into the
    /// share and returns its path relative to the share.
    pub fn add_rootfs(&self, id: &str) -> Result<String> {
        let source = self.rootfs_source(id);
        build_busybox_rootfs(&self.busybox, &source)?;
        self.sandbox()
            .share()
            .add_container(id, &source)
            .with_context(|| format!("cannot add container {id}'s rootfs to the share"))?;
        let relative = SharedDirectory::rootfs_relative_path(id)
            .with_context(|| format!("container id {id:?}"))?;
        Ok(relative.to_string_lossy().into_owned())
    }

    /// Creates (does not start) container `id` running `args` in a fresh
    /// busybox rootfs.
    pub async fn create_container(
        &self,
        id: &str,
        args: &[&str],
        pipes: Pipes,
    ) -> Result<HostStdio> {
        self.create_container_with_spec(id, &container_spec(args, pipes.terminal), pipes)
            .await
    }

    /// Creates container `id` from `spec` in a fresh busybox rootfs.
    pub async fn create_container_with_spec(
        &self,
        id: &str,
        spec: &Value,
        pipes: Pipes,
    ) -> Result<HostStdio> {
        let rootfs_path = self.add_rootfs(id)?;
        self.create_container_in(id, &rootfs_path, spec, pipes)
            .await
    }

    /// Creates container `id` from `spec` on a rootfs already in the share.
    pub async fn create_container_in(
        &self,
        id: &str,
        rootfs_path: &str,
        spec: &Value,
        pipes: Pipes,
    ) -> Result<HostStdio> {
        husk_test_support::agent::create_container(self.client(), id, rootfs_path, spec, pipes)
            .await
    }

    /// Creates and starts container `id`.
    pub async fn run_container(&self, id: &str, args: &[&str], pipes: Pipes) -> Result<HostStdio> {
        let stdio = self.create_container(id, args, pipes).await?;
        self.client()
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
        husk_test_support::agent::exec_process(self.client(), id, exec_id, args, pipes).await
    }

    /// Waits for a process (the container's init when `exec_id` is empty).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        self.client()
            .wait_process(id, exec_id)
            .await
            .with_context(|| format!("WaitProcess {id}/{exec_id:?}"))
    }

    /// Removes container `id` in the guest and its rootfs from the share.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        self.client()
            .remove_container(id, REMOVE_TIMEOUT_SECS)
            .await
            .with_context(|| format!("RemoveContainer {id}"))?;
        self.sandbox()
            .share()
            .remove_container(id)
            .with_context(|| format!("cannot remove container {id}'s rootfs from the share"))?;
        let source = self.rootfs_source(id);
        std::fs::remove_dir_all(&source)
            .with_context(|| format!("cannot remove {}", source.display()))
    }

    /// Sends `DestroySandbox`, waits up to [`POWER_OFF_DEADLINE`] for the
    /// guest to power off, then lets [`Sandbox::destroy`] stop the VM and
    /// remove the sandbox's directory, and reports what is left.
    pub async fn shut_down(mut self) -> Result<Teardown> {
        let sandbox = self
            .sandbox
            .take()
            .context("the sandbox was already shut down")?;
        let vm_exit = self
            .vm_exit
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let work_dir = self.holder.clone();
        let qemu_pid = sandbox.description.vmm_pid;

        let asked = Instant::now();
        let destroy_reply = sandbox
            .client
            .destroy_sandbox(&sandbox.id)
            .await
            .map_err(|error| error.to_string());
        let exited = match vm_exit {
            Some(vm_exit) => tokio::time::timeout(POWER_OFF_DEADLINE, vm_exit)
                .await
                .is_ok(),
            None => false,
        };
        let destroy_to_exit = asked.elapsed();
        // Read before the teardown removes the console with the directory.
        let console = console_tail(&sandbox.paths);
        let teardown = sandbox.destroy().await;
        drop(sandbox);
        remove_holder(&work_dir);
        if !exited {
            bail!(
                "the guest was still running {POWER_OFF_DEADLINE:?} after DestroySandbox \
                 (reply: {destroy_reply:?}); console:\n{console}"
            );
        }
        let vm_end = teardown
            .context("the sandbox's VM had already been stopped")?
            .vm_end;
        let leftovers = Leftovers {
            processes: processes_mentioning(&work_dir),
            qemu_alive: process_exists(qemu_pid),
            mounts: mounts_under(&work_dir),
            work_dir_exists: work_dir.exists(),
            sockets: sockets_under(&work_dir),
        };
        Ok(Teardown {
            destroy_reply,
            destroy_to_exit,
            vm_end,
            leftovers,
        })
    }
}

impl Drop for GuestSandbox {
    fn drop(&mut self) {
        if let Some(sandbox) = self.sandbox.take() {
            // Dropping the VM kills QEMU and ends the device servers, and
            // dropping the share unmounts the containers' rootfs; the
            // shim's cleanup then removes whatever is left of the directory.
            let paths = sandbox.paths.clone();
            drop(sandbox);
            cleanup::remove_sandbox_dir(&paths);
        }
        remove_holder(&self.holder);
    }
}

/// Removes a guest's private root once the shim's cleanup emptied it: only
/// the two empty directories it made, so anything left stays to be seen.
fn remove_holder(holder: &Path) {
    for dir in ["sandboxes", "vm", ""] {
        let _ = std::fs::remove_dir(holder.join(dir));
    }
}

/// The runtime the guest suites and the agent bench run on: several
/// workers, so stream readers run beside the checks; with the host's
/// logging set up ([`init_logging`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
}

/// Sends the host's `tracing` output (the shim's sandbox and our device
/// servers log there) to stderr, filtered by `RUST_LOG` (default: warnings
/// and errors).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
