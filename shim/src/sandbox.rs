//! One pod's sandbox: its VM, the agent client, and the share. Booted by
//! the pod's first `Create`, destroyed when the shim shuts down. A failed
//! boot leaves nothing behind: the VM is stopped, the device servers end,
//! mounts are detached and the sandbox directory is removed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::resources::SharedDirectory;
use anyhow::{anyhow, Context, Result};
use husk_agent_client::agent::CreateSandboxRequest;
use husk_agent_client::{AgentClient, Endpoint};

use crate::cleanup;
use crate::config::{Config, HypervisorKind, VmSize};
use crate::paths::SandboxPaths;
use crate::vm::{ExitWatcher, PodVm, VmDescription, SHARED_FS_TAG};

/// Lines of the guest console quoted in boot errors.
const CONSOLE_TAIL_LINES: usize = 30;

/// A running sandbox.
pub struct Sandbox {
    pub id: String,
    pub paths: SandboxPaths,
    pub client: AgentClient,
    pub description: VmDescription,
    shared: Mutex<Option<SharedDirectory>>,
    vm: Mutex<Option<PodVm>>,
    shutdown_grace: Duration,
}

impl Sandbox {
    /// Boots the VM, waits for the agent and creates the sandbox in the
    /// guest. Returns the sandbox and a watcher of the VM's end.
    pub async fn boot(
        id: &str,
        config: &Config,
        kind: HypervisorKind,
        size: VmSize,
        hostname: &str,
    ) -> Result<(Self, ExitWatcher)> {
        let paths = SandboxPaths::new(id);
        if paths.dir.exists() {
            tracing::warn!(dir = %paths.dir.display(), "a stale sandbox directory exists; cleaning it");
            cleanup::remove_sandbox_dir(&paths);
        }
        std::fs::create_dir_all(paths.share())
            .with_context(|| format!("cannot create {}", paths.share().display()))?;
        let result = Self::boot_in(id, &paths, config, kind, size, hostname).await;
        if result.is_err() {
            cleanup::remove_sandbox_dir(&paths);
        }
        result
    }

    async fn boot_in(
        id: &str,
        paths: &SandboxPaths,
        config: &Config,
        kind: HypervisorKind,
        size: VmSize,
        hostname: &str,
    ) -> Result<(Self, ExitWatcher)> {
        let shared = SharedDirectory::open(&paths.share())
            .with_context(|| format!("cannot open the share {}", paths.share().display()))?;
        let started = Instant::now();
        let (config_owned, paths_owned) = (config.clone(), paths.clone());
        let vm = tokio::task::spawn_blocking(move || {
            PodVm::start(kind, &config_owned, size, &paths_owned)
        })
        .await
        .map_err(|e| anyhow!("the VM start task failed: {e}"))??;
        let description = vm.describe();
        tracing::info!(
            sandbox_id = id,
            backend = description.backend,
            accelerator = %description.accelerator,
            vmm_pid = description.vmm_pid,
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            "VM started"
        );
        let stop_vm = |vm: PodVm| {
            let grace = Duration::from_millis(config.timeouts.shutdown_ms);
            tokio::task::spawn_blocking(move || vm.stop(grace))
        };
        let watcher = match vm.exit_watcher() {
            Ok(watcher) => watcher,
            Err(error) => {
                let _ = stop_vm(vm).await;
                return Err(error);
            }
        };
        let deadline = Duration::from_millis(config.timeouts.agent_ready_ms);
        let endpoint = Endpoint::HybridVsock {
            uds: paths.vsock_uds(),
        };
        let connected = tokio::time::timeout(
            deadline + Duration::from_secs(5),
            AgentClient::connect(endpoint, deadline),
        )
        .await
        .map_err(|_| anyhow!("no answer to the hybrid vsock handshake"))
        .and_then(|r| r.map_err(anyhow::Error::from));
        let client = match connected {
            Ok(client) => client,
            Err(error) => {
                let end = stop_vm(vm).await.unwrap_or_default();
                return Err(error.context(format!(
                    "the guest agent did not answer within {} ms ({} backend, {}; VM end: {end}); guest console:\n{}",
                    config.timeouts.agent_ready_ms,
                    description.backend,
                    description.accelerator,
                    console_tail(paths)
                )));
            }
        };
        tracing::info!(
            sandbox_id = id,
            ms = started.elapsed().as_millis() as u64,
            "agent ready"
        );
        let request = CreateSandboxRequest {
            sandbox_id: id.to_owned(),
            hostname: hostname.to_owned(),
            shared_fs_tag: SHARED_FS_TAG.to_owned(),
            ..Default::default()
        };
        if let Err(error) = client.create_sandbox(request).await {
            let _ = stop_vm(vm).await;
            return Err(anyhow!(error).context(format!(
                "CreateSandbox failed in the guest; console:\n{}",
                console_tail(paths)
            )));
        }
        Ok((
            Self {
                id: id.to_owned(),
                paths: paths.clone(),
                client,
                description,
                shared: Mutex::new(Some(shared)),
                vm: Mutex::new(Some(vm)),
                shutdown_grace: Duration::from_millis(config.timeouts.shutdown_ms),
            },
            watcher,
        ))
    }

    /// Runs `f` with the share, unless the sandbox was destroyed.
    pub fn with_share<T>(&self, f: impl FnOnce(&SharedDirectory) -> Result<T>) -> Result<T> {
        let guard = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let shared = guard
            .as_ref()
            .ok_or_else(|| anyhow!("the sandbox {} is already destroyed", self.id))?;
        f(shared)
    }

    /// Ends the sandbox: asks the guest to power off, stops the VM (killing
    /// it after the grace period), unmounts the share and removes the
    /// sandbox directory. Safe to call twice.
    pub async fn destroy(&self) {
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
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
            let end = tokio::task::spawn_blocking(move || vm.stop(grace))
                .await
                .unwrap_or_default();
            tracing::info!(sandbox_id = %self.id, end = %end, "VM stopped");
        }
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(shared);
        cleanup::remove_sandbox_dir(&self.paths);
    }
}

/// The last lines of the guest console.
pub fn console_tail(paths: &SandboxPaths) -> String {
    let text = std::fs::read(paths.console_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
    lines[start..].join("\n")
}
