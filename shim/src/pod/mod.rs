//! The pod model behind the task service: the pod's sandbox (booted by its
//! first Create), its containers and their processes. Every task RPC is
//! one call here; the task service only decodes requests, maps
//! [`PodError`]s to ttrpc codes and publishes the RPC's event. Exits are
//! found here (the agent's `WaitProcess`, or the VM's end) and published
//! through the pod's [`EventSink`].

mod container;
mod error;
mod exits;
mod health;
mod operator;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use containerd_shim_protos::api::Mount;
use containerd_shim_protos::protobuf::MessageField;
use husk_agent_client::agent::{CreateContainerRequest, StatsContainerResponse};
use oci_spec::runtime::Spec;

pub use container::Container;
use container::Containers;
pub use error::PodError;
use process::{Exit, Lifecycle, Process};

use crate::config::Config;
use crate::events::EventSink;
use crate::hypervisor::{Backend, Launcher, VmSpec};
use crate::ids;
use crate::management::info::{ANNOTATION_CRI_SANDBOX_NAME, ANNOTATION_CRI_SANDBOX_NAMESPACE};
use crate::management::ManagementServer;
use crate::paths::SandboxPaths;
use crate::resources::{ContainerResources, ResourceError};
use crate::sandbox::{BootRequest, PodLabels, Sandbox};
use crate::spec;
use crate::stdio::{LogIdentity, ProcessIo, StdioRequest};

/// Seconds the agent waits for a container's processes at removal.
const REMOVE_TIMEOUT_SECS: u32 = 10;

/// A container to create, as containerd asked for it.
#[derive(Debug, Clone, Default)]
pub struct NewContainer {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioRequest,
    /// The configuration file named in the runtime options, if any.
    pub config_path: Option<PathBuf>,
}

/// What `State` reports of a process.
pub struct ProcessState {
    pub bundle: PathBuf,
    pub lifecycle: Lifecycle,
    pub exit: Option<Exit>,
    pub stdio: StdioRequest,
}

/// One pod; cheap to clone.
#[derive(Clone)]
pub struct Pod {
    inner: Arc<Inner>,
}

struct Inner {
    /// The id this shim was started for (the pod's sandbox id).
    shim_id: String,
    namespace: String,
    /// Where sandbox directories are made.
    run_root: PathBuf,
    launcher: Arc<dyn Launcher>,
    events: Arc<dyn EventSink>,
    /// The running sandbox. Locked only to read or swap it, never across
    /// an await: no RPC waits behind a boot for it.
    sandbox: std::sync::Mutex<Option<Arc<Sandbox>>>,
    /// Held by the one Create that boots the sandbox; a concurrent first
    /// Create of the same pod waits here for that boot.
    boot: tokio::sync::Mutex<()>,
    containers: Containers,
    /// Guest events refused (not of this pod, or repeated too soon).
    dropped_guest_events: AtomicU64,
    /// The pod's management socket while its sandbox runs.
    management: std::sync::Mutex<Option<ManagementServer>>,
}

impl Pod {
    pub fn new(
        shim_id: &str,
        namespace: &str,
        run_root: &Path,
        launcher: Arc<dyn Launcher>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                shim_id: shim_id.to_owned(),
                namespace: namespace.to_owned(),
                run_root: run_root.to_owned(),
                launcher,
                events,
                sandbox: std::sync::Mutex::new(None),
                boot: tokio::sync::Mutex::new(()),
                containers: Containers::default(),
                dropped_guest_events: AtomicU64::new(0),
                management: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The pid containerd sees for every task: guest pids mean nothing on
    /// the host, so the process standing for the pod there is the shim.
    pub fn host_pid() -> u32 {
        std::process::id()
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, PodError> {
        self.inner.containers.get(id)
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, PodError> {
        self.container(id)?.process(exec_id)
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>, PodError> {
        self.current_sandbox()
            .ok_or_else(|| PodError::FailedPrecondition("the pod's VM is not running".into()))
    }

    /// The running sandbox, if any (never waits for a boot).
    fn current_sandbox(&self) -> Option<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn take_sandbox(&self) -> Option<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn identity(&self, sandbox: &Sandbox, container_id: &str) -> LogIdentity {
        LogIdentity {
            container_id: container_id.to_owned(),
            namespace: self.inner.namespace.clone(),
            logger_ready_timeout: sandbox.logger_ready_timeout,
        }
    }

    /// Creates a container, booting the pod's sandbox for its first one.
    /// Nothing of a failed Create stays on the host; a VM booted for it
    /// alone is destroyed again.
    pub async fn create(&self, request: NewContainer) -> Result<(), PodError> {
        ids::validate("container id", &request.id)
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        let reservation = self.inner.containers.reserve(&request.id)?;
        let spec = spec::read_bundle_spec(&request.bundle).map_err(PodError::invalid)?;
        let (config, config_path) = Config::load(request.config_path.as_deref())
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        tracing::info!(
            sandbox_id = %self.inner.shim_id,
            container_id = %request.id,
            config = %config_path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in defaults".into()),
            "creating container"
        );
        crate::fault::crash_point("create-before-boot");
        let sandbox = self
            .ensure_sandbox(&request.id, &spec, &config, config_path.as_deref())
            .await?;
        crate::fault::crash_point("create-vm-booted");
        match self.create_in(&sandbox, &request, spec).await {
            Ok(container) => {
                reservation.commit(container);
                Ok(())
            }
            Err(error) => {
                drop(reservation);
                if self.inner.containers.is_idle() {
                    // Nothing else runs in the pod: do not keep a VM for nothing.
                    self.destroy_sandbox().await;
                }
                Err(error)
            }
        }
    }

    async fn create_in(
        &self,
        sandbox: &Arc<Sandbox>,
        request: &NewContainer,
        spec: Spec,
    ) -> Result<Arc<Container>, PodError> {
        let id = request.id.as_str();
        let (resources, guest_spec) = ContainerResources::prepare(
            sandbox.share(),
            id,
            &request.bundle,
            &request.rootfs,
            spec,
        )
        .map_err(|error| match error {
            ResourceError::Spec(_) => PodError::invalid(error),
            other => PodError::internal("cannot prepare the container on the host")(other),
        })?;
        crate::fault::crash_point("create-rootfs-shared");
        let rootfs_path = resources.rootfs_in_share().map_err(PodError::invalid)?;
        let spec_json = serde_json::to_vec(&guest_spec)
            .map_err(PodError::internal("cannot encode the spec"))?;
        let (streams, io) =
            ProcessIo::connect(&sandbox.client, &request.stdio, &self.identity(sandbox, id))
                .await
                .map_err(PodError::internal("cannot connect the container's stdio"))?;
        let agent_request = CreateContainerRequest {
            container_id: id.to_owned(),
            oci_spec_json: spec_json,
            rootfs_path: rootfs_path.to_string_lossy().into_owned(),
            stdio: MessageField::some(streams),
            ..Default::default()
        };
        sandbox
            .client
            .create_container(agent_request)
            .await
            .map_err(PodError::agent("the guest could not create the container"))?;
        if id == sandbox.id {
            // The pod's network namespace in the guest is the sandbox
            // container's, which exists now.
            if let Err(error) = sandbox.configure_guest_network().await {
                let _ = sandbox.client.remove_container(id, 10).await;
                return Err(PodError::internal("cannot set up the pod's network")(error));
            }
        }
        crate::fault::crash_point("create-in-guest");
        let init = Arc::new(Process::new(id, "", request.stdio.clone(), Vec::new()));
        *init.io.lock().await = Some(io);
        Ok(Arc::new(Container::new(
            id,
            request.bundle.clone(),
            init,
            resources,
        )))
    }

    /// The pod's sandbox, booted now if this is its first container.
    async fn ensure_sandbox(
        &self,
        container_id: &str,
        spec: &Spec,
        config: &Config,
        config_path: Option<&Path>,
    ) -> Result<Arc<Sandbox>, PodError> {
        if let Some(sandbox) = self.current_sandbox() {
            return Ok(sandbox);
        }
        let _booting = self.inner.boot.lock().await;
        if let Some(sandbox) = self.current_sandbox() {
            return Ok(sandbox);
        }
        let sandbox_id = spec::sandbox_id_of(container_id, spec);
        ids::validate("sandbox id", &sandbox_id)
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        let size = config
            .vm_size_for(&spec::annotations(spec))
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        let annotations = spec::annotations(spec);
        tracing::info!(
            sandbox_id = %sandbox_id,
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            cri_memory = annotations.get(crate::config::ANNOTATION_CRI_SANDBOX_MEMORY).map(String::as_str),
            cri_cpu_quota = annotations.get(crate::config::ANNOTATION_CRI_SANDBOX_CPU_QUOTA).map(String::as_str),
            "the pod's VM size"
        );
        let host = husk_vmm::host::probe_host_kvm();
        let (backend, reason) = Backend::resolve(config.hypervisor.kind, &host);
        tracing::info!(
            sandbox_id = %sandbox_id,
            container_id,
            backend = backend.name(),
            reason = %reason,
            "hypervisor chosen"
        );
        let cgroup = pod_cgroup_for(spec, config, size)?;
        let paths = SandboxPaths::under(&self.inner.run_root, &sandbox_id);
        let vm_spec = VmSpec::for_pod(
            config,
            config_path,
            backend,
            size,
            &paths.vm_dir,
            &paths.console_log(),
        )
        .map_err(|error| PodError::FailedPrecondition(error.to_string()))?;
        let request = BootRequest {
            sandbox_id: &sandbox_id,
            config,
            spec: vm_spec,
            hostname: spec.hostname().as_deref().unwrap_or_default(),
            paths,
            cgroup,
            netns: spec::pod_netns(container_id, spec),
            labels: PodLabels {
                name: annotations.get(ANNOTATION_CRI_SANDBOX_NAME).cloned(),
                namespace: annotations.get(ANNOTATION_CRI_SANDBOX_NAMESPACE).cloned(),
            },
        };
        let (sandbox, watcher) = Sandbox::boot(self.inner.launcher.as_ref(), request)
            .await
            .map_err(PodError::internal("cannot start the pod's VM"))?;
        let sandbox = Arc::new(sandbox);
        *self.inner.sandbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(sandbox.clone());
        self.serve_management(&sandbox);
        let pod = self.clone();
        tokio::spawn(async move {
            let end = watcher.await;
            pod.vm_ended(&end).await;
        });
        let pod = self.clone();
        let client = sandbox.client.clone();
        tokio::spawn(async move { pod.forward_guest_events(client).await });
        let pod = self.clone();
        let watched = Arc::downgrade(&sandbox);
        tokio::spawn(async move { pod.watch_agent_health(watched).await });
        Ok(sandbox)
    }

    async fn destroy_sandbox(&self) {
        self.stop_management();
        if let Some(sandbox) = self.take_sandbox() {
            sandbox.destroy().await;
        }
    }

    /// Deletes a stopped process. For a container's init this removes the
    /// container in the guest and everything it had on the host.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Exit, PodError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if matches!(process.lifecycle(), Lifecycle::Running | Lifecycle::Paused) {
            return Err(PodError::FailedPrecondition(format!(
                "cannot delete process {exec_id:?} of container {id}: it is still running"
            )));
        }
        let exit = process.exit().unwrap_or_else(|| Exit::now(0));
        if !exec_id.is_empty() {
            process.io.lock().await.take();
            container.remove_exec(exec_id);
            return Ok(exit);
        }
        if let Ok(sandbox) = self.sandbox().await {
            if let Err(error) = sandbox
                .client
                .remove_container(id, REMOVE_TIMEOUT_SECS)
                .await
            {
                tracing::warn!(%error, container_id = %id, "RemoveContainer failed");
            }
        }
        for process in container.all_processes() {
            process.io.lock().await.take();
        }
        container.release_resources();
        self.inner.containers.remove(id);
        tracing::info!(sandbox_id = %self.inner.shim_id, container_id = %id, "container deleted");
        Ok(exit)
    }

    /// What `State` reports.
    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessState, PodError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        Ok(ProcessState {
            bundle: container.bundle.clone(),
            lifecycle: process.lifecycle(),
            exit: process.exit(),
            stdio: process.stdio.clone(),
        })
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, PodError> {
        self.container(id)?;
        let processes = self
            .sandbox()
            .await?
            .client
            .list_processes(id)
            .await
            .map_err(PodError::agent("cannot list the container's processes"))?;
        Ok(processes.into_iter().map(|p| p.pid).collect())
    }

    /// Pauses (`true`) or resumes a container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), PodError> {
        let container = self.container(id)?;
        let sandbox = self.sandbox().await?;
        if paused {
            sandbox.client.pause_container(id).await
        } else {
            sandbox.client.resume_container(id).await
        }
        .map_err(PodError::agent("cannot pause or resume the container"))?;
        container.init.set_paused(paused);
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: &str) -> Result<(), PodError> {
        self.container(id)?;
        self.sandbox()
            .await?
            .client
            .update_container(id, resources_json)
            .await
            .map_err(PodError::agent("cannot update the container's resources"))
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse, PodError> {
        self.container(id)?;
        self.sandbox()
            .await?
            .client
            .stats_container(id)
            .await
            .map_err(PodError::agent("cannot read the container's statistics"))
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        height: u32,
        width: u32,
    ) -> Result<(), PodError> {
        self.process(id, exec_id)?;
        self.sandbox()
            .await?
            .client
            .tty_win_resize(id, exec_id, height, width)
            .await
            .map_err(PodError::agent("cannot resize the terminal"))
    }

    /// CloseIO: ends the process's stdin when `stdin` is set. An unknown
    /// container or exec is NOT_FOUND either way.
    pub async fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<(), PodError> {
        let process = self.process(id, exec_id)?;
        if stdin {
            if let Some(io) = process.io.lock().await.as_ref() {
                io.close_stdin();
            }
        }
        Ok(())
    }

    /// Ends the pod if no container remains; returns whether it ended.
    pub async fn shutdown(&self) -> bool {
        let remaining = self.inner.containers.count();
        if remaining > 0 {
            tracing::info!(sandbox_id = %self.inner.shim_id, remaining, "Shutdown ignored: containers remain");
            return false;
        }
        self.destroy_sandbox().await;
        tracing::info!(sandbox_id = %self.inner.shim_id, "shim shutting down");
        true
    }
}

#[cfg(test)]
mod tests;

/// The pod's cgroup from the sandbox spec's `linux.cgroupsPath` (when
/// `confinement.sandbox_cgroup` is on), after checking that the VM fits the
/// limits already set on it and its parents.
fn pod_cgroup_for(
    spec: &Spec,
    config: &Config,
    size: crate::config::VmSize,
) -> Result<Option<std::path::PathBuf>, PodError> {
    use crate::config::{ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS};
    use crate::resources::pod_cgroup;
    if !config.confinement.sandbox_cgroup {
        return Ok(None);
    }
    let Some(cgroups_path) = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.cgroups_path().clone())
    else {
        return Ok(None);
    };
    let relative = pod_cgroup::relative_dir(&cgroups_path.to_string_lossy())
        .map_err(|e| PodError::InvalidArgument(format!("{e:#}")))?;
    let hierarchies =
        pod_cgroup::hierarchies().map_err(|e| PodError::FailedPrecondition(format!("{e:#}")))?;
    let annotations = spec::annotations(spec);
    let from = |annotation: &str, setting: &str| {
        if annotations.contains_key(annotation) {
            format!("annotation {annotation}")
        } else {
            setting.to_owned()
        }
    };
    pod_cgroup::check_vm_fits(
        &hierarchies,
        &relative,
        size.vcpus,
        size.memory_mib,
        &from(ANNOTATION_MEMORY_MIB, "hypervisor.default_memory_mib"),
        &from(ANNOTATION_VCPUS, "hypervisor.default_vcpus"),
    )
    .map_err(|e| PodError::InvalidArgument(format!("{e:#}")))?;
    Ok(Some(relative))
}
