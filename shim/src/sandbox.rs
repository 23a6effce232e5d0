//! One pod's sandbox: its VM (behind the [`Hypervisor`] seam), the agent
//! client, and the share. Booted by the pod's first `Create`, destroyed
//! when the shim shuts down. A failed boot leaves nothing behind: the VM is
//! stopped, the device servers end, mounts are detached and the sandbox
//! directory is removed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use husk_agent_client::agent::{ConfigureNetworkRequest, CreateSandboxRequest, RestoredRequest};
use husk_agent_client::{AgentClient, Endpoint};
use husk_devices::fs::{CachePolicy, FsConfig};

use crate::boot_phases::BootPhases;
use crate::config::{Config, SeccompAction};
use crate::hypervisor::{
    Device, ExitWatcher, Hypervisor, Launcher, NetBackend, VmInfo, VmSpec, GUEST_CID, SHARED_FS_TAG,
};
use crate::management::RpcLatency;
use crate::network::port_forward::{PortForwardListener, PortForwarding};
use crate::network::Attachment;
use crate::paths::SandboxPaths;
use crate::resources::{cleanup, pod_cgroup, ShareTreeLimits, SharedDirectory};

/// Mode of a sandbox directory: only the shim (root) enters it.
const SANDBOX_DIR_MODE: u32 = 0o700;
/// Lines of the guest console quoted in boot errors.
const CONSOLE_TAIL_LINES: usize = 30;
/// Extra time, beyond the agent deadline, for the last handshake attempt.
const HANDSHAKE_SLACK: Duration = Duration::from_secs(5);

/// What a sandbox is booted from.
pub struct BootRequest<'a> {
    pub sandbox_id: &'a str,
    pub config: &'a Config,
    pub spec: VmSpec,
    pub hostname: &'a str,
    pub paths: SandboxPaths,
    /// The pod's cgroup (relative to each hierarchy's root) the shim joins
    /// before it starts the VM; `None` leaves the shim where it is.
    pub cgroup: Option<PathBuf>,
    /// The pod's network namespace on the host (CNI's, from the sandbox
    /// spec); `None` for a pod with loopback only.
    pub netns: Option<PathBuf>,
    /// What CRI calls the pod, for operators.
    pub labels: PodLabels,
}

/// The pod's Kubernetes name and namespace, from the sandbox spec's CRI
/// annotations (`None` for a pod CRI did not make).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodLabels {
    pub name: Option<String>,
    pub namespace: Option<String>,
}

/// A running sandbox.
pub struct Sandbox {
    pub id: String,
    pub paths: SandboxPaths,
    pub client: AgentClient,
    pub description: VmInfo,
    /// From launching the VM until the agent answered `Check`.
    pub agent_ready_after: Duration,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// When the VM was started.
    pub started_at: SystemTime,
    pub labels: PodLabels,
    /// Whether the agent serves the debug shell (`debug_console`).
    pub debug_console: bool,
    /// The agent calls' latencies, for the management socket.
    pub rpc_latency: RpcLatency,
    /// Where the pod's start time went ([`Sandbox::container_started`]
    /// adds the last phase).
    phases: Mutex<BootPhases>,
    /// When the VMM was being made (the phases' origin).
    launched: Instant,
    share: Arc<SharedDirectory>,
    vm: Mutex<Option<Box<dyn Hypervisor>>>,
    shutdown_grace: Duration,
    /// How the running agent's health is watched.
    pub health: HealthPolicy,
    /// `timeouts.logger_ready_ms`, for the pod's `binary://` loggers.
    pub logger_ready_timeout: Duration,
    /// The pod's CNI interface mirrored to the VM's NIC, undone at destroy.
    network: Mutex<Option<Attachment>>,
    /// What the agent is told of it once the sandbox container exists.
    network_request: Option<ConfigureNetworkRequest>,
    /// CRI port-forward into the pod (CNI pods only); stopped at destroy.
    port_forwarding: Mutex<Option<PortForwarding>>,
}

/// When a running guest counts as dead (`[timeouts]` `health_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    pub interval: Duration,
    pub probe_timeout: Duration,
    pub failures: u32,
}

impl HealthPolicy {
    pub fn from_config(config: &Config) -> Self {
        Self {
            interval: Duration::from_millis(config.timeouts.health_interval_ms),
            probe_timeout: Duration::from_millis(config.timeouts.health_probe_ms),
            failures: config.timeouts.health_failures,
        }
    }
}

/// The virtio-fs configuration of a pod's share.
fn fs_config(share: &Path, config: &Config) -> Result<FsConfig> {
    let mut fs = FsConfig::new(share);
    fs.tag = SHARED_FS_TAG.to_owned();
    fs.cache = [
        CachePolicy::Never,
        CachePolicy::Metadata,
        CachePolicy::Auto,
        CachePolicy::Always,
    ]
    .into_iter()
    .find(|policy| policy.as_str() == config.shared_fs.cache)
    .ok_or_else(|| {
        anyhow!(
            "shared_fs.cache = {:?} is not a virtio-fs cache policy",
            config.shared_fs.cache
        )
    })?;
    fs.xattr = config.shared_fs.xattr;
    fs.max_open_inodes = config.shared_fs.max_open_inodes;
    fs.max_open_handles = config.shared_fs.max_open_handles;
    fs.allow_setuid = config.shared_fs.allow_setuid;
    Ok(fs)
}

/// The `Restored` request for a VM restored from a template: the host's
/// wall clock, 64 fresh random bytes, the pod's NIC addresses.
fn restored_request(nic_macs: Vec<Vec<u8>>) -> Result<RestoredRequest> {
    let realtime_unix_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the host clock is before 1970")?
        .as_nanos() as u64;
    let mut entropy = vec![0u8; 64];
    crate::random::fill(&mut entropy).context("getrandom for the restored guest")?;
    Ok(RestoredRequest {
        realtime_unix_ns,
        entropy,
        nic_macs,
        ..Default::default()
    })
}

/// Stops a VM off the async runtime (stopping blocks).
async fn stop_vm(mut vm: Box<dyn Hypervisor>, grace: Duration) -> String {
    tokio::task::spawn_blocking(move || vm.stop(grace))
        .await
        .unwrap_or_else(|error| format!("the stop task failed: {error}"))
}

/// What the shim does to itself before it starts a VM: the confinement
/// policy its device threads will apply (`[confinement]`), its rlimits, and
/// its move into the pod's cgroup.
fn confine_shim(config: &Config, paths: &SandboxPaths, cgroup: Option<&Path>) -> Result<()> {
    let settings = &config.confinement;
    let wanted = husk_confine::Policy {
        seccomp: settings.seccomp,
        action: match settings.seccomp_action {
            SeccompAction::Kill => husk_confine::ViolationAction::Kill,
            SeccompAction::Trap => husk_confine::ViolationAction::Trap,
            SeccompAction::Log => husk_confine::ViolationAction::Log,
        },
        fs_private_root: settings.fs_mount_namespace,
    };
    let in_force = husk_confine::set_policy(wanted);
    if in_force != wanted {
        tracing::warn!(
            ?in_force,
            ?wanted,
            "this shim's confinement policy was set before; it stays"
        );
    }
    // The floor under every thread, QEMU and the loggers (the control
    // threads' confinement), loaded before any device thread exists.
    husk_confine::control::confine_process(in_force)
        .context("cannot load the shim's process-wide seccomp deny list")?;
    let applied = husk_confine::rlimits::apply(settings.max_open_files, settings.max_file_bytes)
        .with_context(|| {
            format!(
                "cannot set the shim's rlimits (confinement.max_open_files = {}, max_file_bytes = {})",
                settings.max_open_files, settings.max_file_bytes
            )
        })?;
    if applied.max_open_files < settings.max_open_files
        || applied.max_file_bytes < settings.max_file_bytes
    {
        tracing::warn!(
            max_open_files = applied.max_open_files,
            max_file_bytes = applied.max_file_bytes,
            "the shim's hard rlimits are below confinement.max_open_files/max_file_bytes; the lower ones stay"
        );
    }
    if let Some(relative) = cgroup {
        let hierarchies = pod_cgroup::hierarchies()?;
        pod_cgroup::join(&hierarchies, relative, &paths.dir).with_context(|| {
            format!(
                "cannot place the shim in the pod's cgroup {}",
                relative.display()
            )
        })?;
        tracing::info!(cgroup = %relative.display(), "the shim and its VM run in the pod's cgroup");
    }
    Ok(())
}

/// Writes what the kernel reports for the shim's threads and the VMM
/// (seccomp, capabilities, no_new_privs, mount namespace) and the cgroups
/// they are in to `confinement.json`, for `husk check` and operators. Read
/// back from /proc, not from what the shim meant to do.
fn write_confinement_report(paths: &SandboxPaths, vmm_pid: Option<u32>) {
    let process = |pid: u32| {
        serde_json::json!({
            "pid": pid,
            "cgroup": std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default(),
            "threads": husk_confine::report::threads_of(pid).unwrap_or_default(),
        })
    };
    let report = serde_json::json!({
        "policy": husk_confine::policy().map(|p| format!("{p:?}")),
        "shim": process(std::process::id()),
        "vmm": vmm_pid.map(process),
    });
    let path = paths.confinement_report();
    if let Err(error) = std::fs::write(&path, format!("{report:#}\n")) {
        tracing::warn!(%error, path = %path.display(), "cannot write the confinement report");
    }
}

impl Sandbox {
    /// Boots the VM through `launcher`, waits for the agent and creates the
    /// sandbox in the guest. Returns the sandbox and a watcher of the VM's
    /// end.
    pub async fn boot(
        launcher: &dyn Launcher,
        request: BootRequest<'_>,
    ) -> Result<(Self, ExitWatcher)> {
        let paths = request.paths.clone();
        paths
            .check_socket_room()
            .map_err(|reason| anyhow!(reason))?;
        if paths.dir.exists() || paths.vm_dir.exists() {
            tracing::warn!(dir = %paths.dir.display(), vm_dir = %paths.vm_dir.display(), "a stale sandbox directory exists; cleaning it");
            cleanup::remove_sandbox_dir(&paths);
        }
        // The pod's sockets, console and share are the shim's alone.
        for dir in [&paths.dir, &paths.vm_dir] {
            let made = std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(SANDBOX_DIR_MODE))
                        .with_context(|| format!("cannot restrict {}", dir.display()))
                });
            if let Err(error) = made {
                cleanup::remove_sandbox_dir(&paths);
                return Err(error);
            }
        }
        // Port-forward's steering needs bpf(2), which the process-wide deny
        // list below takes away.
        let port_forward = match request.netns.clone() {
            Some(path) => open_port_forward(path).await,
            None => None,
        };
        if let Err(error) =
            crate::logging::keep_pod_log(&paths.shim_log(), request.config.shim_log_max_bytes)
        {
            tracing::warn!(%error, path = %paths.shim_log().display(), "the pod's shim.log cannot be kept");
        }
        let result = match confine_shim(request.config, &paths, request.cgroup.as_deref()) {
            Ok(()) => Self::boot_in(launcher, request, port_forward).await,
            Err(error) => Err(error),
        };
        if result.is_err() {
            cleanup::remove_sandbox_dir(&paths);
        }
        result
    }

    async fn boot_in(
        launcher: &dyn Launcher,
        request: BootRequest<'_>,
        port_forward: Option<PortForwardListener>,
    ) -> Result<(Self, ExitWatcher)> {
        let BootRequest {
            sandbox_id: id,
            config,
            spec,
            hostname,
            paths,
            cgroup: _,
            netns,
            labels,
        } = request;
        let mut spec = spec;
        if config.debug_console {
            if spec.backend == crate::hypervisor::Backend::Qemu
                && config.hypervisor.qemu_run_as == crate::config::QemuRunAs::Unprivileged
            {
                return Err(anyhow!(
                    "debug_console = true needs hypervisor.qemu_run_as = \"root\" under the \
                     QEMU backend: the debug initramfs is written in the pod's root-only VM \
                     directory, which QEMU's own uid cannot read"
                ));
            }
            spec.initrd = crate::debug_console::write_debug_initrd(
                &spec.initrd,
                &config.debug_shell,
                &paths.vm_dir,
            )
            .context("debug_console = true")?;
            // The debug initramfs is the pod's own: no template is shared.
            spec.template_root = None;
        }
        let shutdown_grace = Duration::from_millis(config.timeouts.shutdown_ms);
        let limits = ShareTreeLimits {
            max_bytes: config.shared_fs.tree_max_bytes,
            max_inodes: config.shared_fs.tree_max_inodes,
        };
        let share = SharedDirectory::create(&paths.dir, limits)
            .with_context(|| format!("cannot make the share in {}", paths.dir.display()))?;
        let (vcpus, memory_mib) = (spec.vcpus, spec.memory_mib);
        let mut network = match netns {
            Some(path) => Some(
                tokio::task::spawn_blocking(move || Attachment::attach(&path))
                    .await
                    .map_err(|e| anyhow!("the network attach task failed: {e}"))?
                    .context("cannot carry the pod's network into its VM")?,
            ),
            None => None,
        };
        let network_request = network.as_ref().map(Attachment::agent_request);
        let started = Instant::now();
        let started_at = SystemTime::now();
        let mut phases = BootPhases::default();
        let mut vm = launcher.create(spec)?;
        vm.add_device(Device::Vsock {
            guest_cid: GUEST_CID,
            uds: paths.vsock_uds(),
            // The device's default (Firecracker's 1023): a pod's agent needs
            // a handful of streams, and the limit bounds the host fds a
            // guest can make the shim hold.
            max_connections: husk_devices::vsock::DEFAULT_MAX_CONNECTIONS,
        })?;
        vm.add_device(Device::SharedFs(fs_config(&paths.share(), config)?))?;
        // The pod's NIC addresses in device order, for a VM restored from a
        // template (whose guest still has the template's).
        let mut nic_macs = Vec::new();
        if let Some(attachment) = network.as_mut() {
            if let Some(tap) = attachment.take_tap() {
                let net_config = attachment.net_config();
                nic_macs.push(net_config.mac.to_vec());
                vm.add_device(Device::Net(NetBackend {
                    tap,
                    config: net_config,
                }))?;
            }
        }
        let (mut vm, started_vm) = tokio::task::spawn_blocking(move || {
            let result = vm.start();
            (vm, result)
        })
        .await
        .map_err(|e| anyhow!("the VM start task failed: {e}"))?;
        if let Err(error) = started_vm {
            let end = tokio::task::spawn_blocking(move || vm.stop(Duration::ZERO)).await;
            tracing::debug!(?end, "the VM that failed to start is stopped");
            return Err(error.into());
        }
        let description = vm.describe();
        phases.vm_start = Some(started.elapsed());
        tracing::info!(
            sandbox_id = id,
            backend = description.backend,
            accelerator = %description.accelerator,
            vmm_pid = description.vmm_pid,
            vcpus,
            memory_mib,
            "VM started"
        );
        write_confinement_report(
            &paths,
            (description.vmm_pid != std::process::id()).then_some(description.vmm_pid),
        );
        let (watcher, endpoint) = match vm
            .exit_watcher()
            .and_then(|w| Ok((w, vm.agent_endpoint()?)))
        {
            Ok(pair) => pair,
            Err(error) => {
                stop_vm(vm, Duration::ZERO).await;
                return Err(error.into());
            }
        };
        let deadline = Duration::from_millis(config.timeouts.agent_ready_ms);
        let connected = tokio::time::timeout(
            deadline + HANDSHAKE_SLACK,
            AgentClient::connect(endpoint.clone(), deadline),
        )
        .await
        .map_err(|_| anyhow!("no answer to the hybrid vsock handshake"))
        .and_then(|r| r.map_err(anyhow::Error::from));
        let rpc_latency = RpcLatency::new();
        let client = match connected {
            Ok(client) => client
                .with_call_timeout(Duration::from_millis(config.timeouts.agent_call_ms))
                .with_call_observer(rpc_latency.observer()),
            Err(error) => {
                let end = stop_vm(vm, shutdown_grace).await;
                return Err(error.context(format!(
                    "the guest agent did not answer within {} ms ({} backend, {}; VM end: {end}); guest console:\n{}",
                    config.timeouts.agent_ready_ms,
                    description.backend,
                    description.accelerator,
                    console_tail(&paths)
                )));
            }
        };
        if vm.restored_from_template() {
            if let Err(error) = client.restored(restored_request(nic_macs)?).await {
                vm.reject_template(&error.to_string());
                stop_vm(vm, Duration::ZERO).await;
                return Err(anyhow!(error).context(
                    "the agent of a VM restored from a template refused Restored (clock, entropy, NIC addresses)",
                ));
            }
        }
        let (vm, saved) = tokio::task::spawn_blocking(move || {
            let result = vm.after_agent_ready();
            (vm, result)
        })
        .await
        .map_err(|e| anyhow!("the template task failed: {e}"))?;
        if let Err(error) = saved {
            stop_vm(vm, Duration::ZERO).await;
            return Err(error.into());
        }
        let agent_ready_after = started.elapsed();
        phases.agent_ready = phases.vm_start.map(|vm_start| agent_ready_after - vm_start);
        tracing::info!(
            sandbox_id = id,
            ms = agent_ready_after.as_millis() as u64,
            "agent ready"
        );
        let request = CreateSandboxRequest {
            sandbox_id: id.to_owned(),
            hostname: hostname.to_owned(),
            shared_fs_tag: SHARED_FS_TAG.to_owned(),
            ..Default::default()
        };
        let creating = Instant::now();
        if let Err(error) = client.create_sandbox(request).await {
            stop_vm(vm, Duration::ZERO).await;
            return Err(anyhow!(error).context(format!(
                "CreateSandbox failed in the guest; console:\n{}",
                console_tail(&paths)
            )));
        }
        let port_forwarding = port_forward.and_then(|listener| {
            serve_port_forward(
                listener,
                &endpoint,
                config.limits.max_port_forward_connections,
            )
        });
        phases.sandbox_create = Some(creating.elapsed());
        // The kernel's share of the boot, as the guest measured it.
        match client.guest_metrics().await {
            Ok(guest) => phases.set_guest_kernel(guest.agent_started_uptime_ms),
            Err(error) => tracing::debug!(%error, "GetGuestMetrics after boot"),
        }
        if config.debug_console {
            if let Err(error) = client.start_debug_console().await {
                stop_vm(vm, Duration::ZERO).await;
                return Err(anyhow!(error).context(
                    "debug_console = true, but the guest could not serve its debug shell",
                ));
            }
            tracing::warn!(
                sandbox_id = id,
                "the guest serves a debug shell (debug_console = true)"
            );
        }
        Ok((
            Self {
                id: id.to_owned(),
                paths,
                client,
                description,
                agent_ready_after,
                vcpus,
                memory_mib,
                started_at,
                labels,
                debug_console: config.debug_console,
                rpc_latency,
                phases: Mutex::new(phases),
                launched: started,
                share: Arc::new(share),
                vm: Mutex::new(Some(vm)),
                shutdown_grace,
                health: HealthPolicy::from_config(config),
                logger_ready_timeout: Duration::from_millis(config.timeouts.logger_ready_ms),
                network: Mutex::new(network),
                network_request,
                port_forwarding: Mutex::new(port_forwarding),
            },
            watcher,
        ))
    }

    /// The phases of the pod's start measured so far.
    pub fn boot_phases(&self) -> BootPhases {
        *self.phases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a container was started; the first one completes the
    /// pod's boot phases, which are logged then (once per pod).
    pub fn container_started(&self) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        if phases.first_container_start.is_some() {
            return;
        }
        let (Some(vm_start), Some(agent_ready), Some(create)) =
            (phases.vm_start, phases.agent_ready, phases.sandbox_create)
        else {
            return;
        };
        let since_launch = self.launched.elapsed();
        phases.first_container_start =
            Some(since_launch.saturating_sub(vm_start + agent_ready + create));
        crate::boot_phases::log(&self.id, &phases);
    }

    /// The pod's share, where containers' rootfs and volumes are mounted.
    pub fn share(&self) -> &Arc<SharedDirectory> {
        &self.share
    }

    /// Has the agent configure the pod's network in the guest (its NIC
    /// moved into the sandbox container's namespace, named, addressed,
    /// routed); a no-op for a pod without CNI network. Called once the
    /// sandbox container exists in the guest.
    pub async fn configure_guest_network(&self) -> Result<()> {
        let Some(request) = self.network_request.clone() else {
            return Ok(());
        };
        self.client
            .configure_network(request)
            .await
            .map_err(|error| {
                anyhow!(error).context("the guest could not configure the pod's network")
            })?;
        tracing::info!(sandbox_id = %self.id, "the pod's network is configured in the guest");
        Ok(())
    }

    /// Stops the VM at once, without asking the guest (declared dead). Its
    /// exit watcher then reports the end; [`Self::destroy`] still cleans up.
    pub async fn kill_vm(&self) -> Option<String> {
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let end = stop_vm(vm, Duration::ZERO).await;
        tracing::warn!(sandbox_id = %self.id, end = %end, "VM stopped: the guest was declared dead");
        Some(end)
    }

    /// Ends the sandbox: asks the guest to power off, stops the VM (killing
    /// it after the grace period), and removes the sandbox directory with
    /// everything mounted in it. Safe to call twice; only the call that
    /// stopped the VM reports how it ended.
    pub async fn destroy(&self) -> Option<Teardown> {
        // No new forwarded connections, and the open ones end.
        drop(
            self.port_forwarding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut teardown = None;
        if let Some(vm) = vm {
            let destroy = self.client.destroy_sandbox(&self.id);
            // Once the guest has torn its containers down there is nothing
            // left in it to save: the VM is stopped at once rather than
            // waiting for the guest kernel's power-off (a second under TCG).
            let grace = match tokio::time::timeout(self.shutdown_grace, destroy).await {
                Ok(Ok(())) => Duration::ZERO,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "DestroySandbox (the guest may power off first)");
                    self.shutdown_grace
                }
                Err(_) => {
                    tracing::warn!("DestroySandbox got no answer in time");
                    Duration::ZERO
                }
            };
            let end = stop_vm(vm, grace).await;
            tracing::info!(sandbox_id = %self.id, end = %end, "VM stopped");
            teardown = Some(Teardown { vm_end: end });
        }
        let network = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(attachment) = network {
            let detached = tokio::task::spawn_blocking(move || attachment.detach()).await;
            match detached {
                Ok(Ok(())) => {
                    tracing::info!(sandbox_id = %self.id, "the pod's TAP and filters are removed")
                }
                Ok(Err(error)) => {
                    tracing::warn!(sandbox_id = %self.id, error = %format!("{error:#}"), "cannot remove the pod's TAP mirroring")
                }
                Err(error) => {
                    tracing::warn!(sandbox_id = %self.id, %error, "the network detach task failed")
                }
            }
        }
        cleanup::remove_sandbox_dir(&self.paths);
        teardown
    }
}

/// The port-forward listener in the pod's network namespace at `netns`, or
/// `None` (logged) when the host cannot steer connections to it: the pod
/// still runs, without CRI port-forward.
async fn open_port_forward(netns: PathBuf) -> Option<PortForwardListener> {
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&netns).with_context(|| {
            format!(
                "cannot open the pod's network namespace {}",
                netns.display()
            )
        })?;
        PortForwardListener::open(&file)
    })
    .await
    .map_err(|e| anyhow!("the port-forward setup task failed: {e}"))
    .and_then(|opened| opened);
    match opened {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "CRI port-forward is unavailable for this pod");
            None
        }
    }
}

/// Starts forwarding through the agent `endpoint`, or `None` (logged).
fn serve_port_forward(
    listener: PortForwardListener,
    endpoint: &Endpoint,
    max_connections: usize,
) -> Option<PortForwarding> {
    let Endpoint::HybridVsock { uds } = endpoint else {
        tracing::warn!(%endpoint, "CRI port-forward needs the VM's hybrid vsock; it is unavailable");
        return None;
    };
    match listener.serve(uds.clone(), max_connections) {
        Ok(forwarding) => Some(forwarding),
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "CRI port-forward is unavailable for this pod");
            None
        }
    }
}

/// What [`Sandbox::destroy`] saw, for the suites that check a teardown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Teardown {
    /// How the VM ended, as its backend tells it (for QEMU a `GuestEnd`:
    /// `PoweredOff` when the guest had powered itself off).
    pub vm_end: String,
}

/// The last lines of the guest console (read from its end, across the
/// rotated file).
pub fn console_tail(paths: &SandboxPaths) -> String {
    use crate::hypervisor::console::{read_tail, CONSOLE_TAIL_BYTES};
    let text = read_tail(&paths.console_log(), CONSOLE_TAIL_BYTES);
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
    lines[start..].join("\n")
}
