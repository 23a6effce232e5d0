//! The pod's side of its management socket (`crate::management`): what
//! `/info` and `/metrics` read of the pod. The server holds the pod
//! weakly, runs while the sandbox runs, and is stopped (its socket
//! removed) before the sandbox is destroyed.

use std::sync::{Arc, Weak};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;

use super::{Inner, Pod};
use crate::management::{self, Endpoint, ManagementServer, SandboxInfo, Scrape};
use crate::sandbox::Sandbox;

struct PodEndpoint {
    pod: Weak<Inner>,
}

impl PodEndpoint {
    fn sandbox(&self) -> Result<(Pod, Arc<Sandbox>), String> {
        let inner = self.pod.upgrade().ok_or("the pod is gone")?;
        let pod = Pod { inner };
        let sandbox = pod.current_sandbox().ok_or("the pod's VM is not running")?;
        Ok((pod, sandbox))
    }
}

fn info_of(pod: &Pod, sandbox: &Sandbox) -> SandboxInfo {
    let mut containers: Vec<String> = pod
        .inner
        .containers
        .all()
        .iter()
        .map(|c| c.id.clone())
        .collect();
    containers.sort();
    SandboxInfo {
        sandbox_id: sandbox.id.clone(),
        namespace: pod.inner.namespace.clone(),
        backend: sandbox.description.backend.to_owned(),
        accelerator: sandbox.description.accelerator.clone(),
        shim_pid: std::process::id(),
        vmm_pid: sandbox.description.vmm_pid,
        vcpus: sandbox.vcpus,
        memory_mib: sandbox.memory_mib,
        started_at_unix_s: sandbox
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        uptime_s: sandbox.started_at.elapsed().map_or(0, |d| d.as_secs()),
        containers,
        pod_name: sandbox.labels.name.clone(),
        pod_namespace: sandbox.labels.namespace.clone(),
        debug_console: sandbox.debug_console,
        console_log: sandbox.paths.console_log(),
        shim_log: sandbox.paths.shim_log(),
    }
}

#[async_trait]
impl Endpoint for PodEndpoint {
    async fn info(&self) -> Result<SandboxInfo, String> {
        let (pod, sandbox) = self.sandbox()?;
        Ok(info_of(&pod, &sandbox))
    }

    async fn metrics(&self) -> Result<String, String> {
        let (pod, sandbox) = self.sandbox()?;
        let info = info_of(&pod, &sandbox);
        let guest = match sandbox.client.guest_metrics().await {
            Ok(guest) => Some(guest),
            Err(error) => {
                tracing::debug!(sandbox_id = %sandbox.id, %error, "GetGuestMetrics for a scrape");
                None
            }
        };
        let shim_pid = std::process::id();
        let vmm_pid = sandbox.description.vmm_pid;
        let scrape = Scrape {
            info: &info,
            shim: management::procfs::read(shim_pid),
            vmm: (vmm_pid != shim_pid)
                .then(|| management::procfs::read(vmm_pid))
                .flatten(),
            guest,
            devices: husk_devices::counters::snapshot(),
            phases: sandbox.boot_phases(),
            rpc: &sandbox.rpc_latency,
        };
        management::render(&scrape).map_err(|e| e.to_string())
    }
}

impl Pod {
    /// Serves the management socket of `sandbox`; a failure is logged and
    /// costs only the operator's view.
    pub(super) fn serve_management(&self, sandbox: &Sandbox) {
        let path = sandbox.paths.management_socket();
        let endpoint = Arc::new(PodEndpoint {
            pod: Arc::downgrade(&self.inner),
        });
        match ManagementServer::start(&path, endpoint) {
            Ok(server) => {
                tracing::info!(sandbox_id = %sandbox.id, socket = %server.path().display(), "management socket serving");
                *self
                    .inner
                    .management
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(server);
            }
            Err(error) => {
                tracing::warn!(sandbox_id = %sandbox.id, %error, "no management socket for this pod")
            }
        }
    }

    pub(super) fn stop_management(&self) {
        let server = self
            .inner
            .management
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(server);
    }
}
