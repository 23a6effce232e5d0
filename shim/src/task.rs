//! The containerd task service (task API v2) of one pod: every RPC
//! containerd sends the shim, served from the shim's process table and the
//! guest agent. The pod's first `Create` boots the sandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::resources::SharedDirectory;
use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::context::Context;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::ProcessInfo;
use husk_agent_client::agent::{CreateContainerRequest, ExecProcessRequest};
use husk_agent_client::ClientError;

use crate::config::{self, Config};
use crate::metrics;
use crate::options;
use crate::process::{Exit, Lifecycle, Process};
use crate::rootfs;
use crate::sandbox::Sandbox;
use crate::spec::{self, SharedMounts};
use crate::stdio::{LogIdentity, ProcessIo, StdioRequest};

/// How long a process's output may keep flowing after its exit is known.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Seconds the agent waits for a container's processes at removal.
const REMOVE_TIMEOUT_SECS: u32 = 10;
/// Exit status reported for processes whose VM ended under them.
const VM_GONE_EXIT_STATUS: u32 = 255;
/// Long-poll period for guest events.
const EVENT_POLL_MS: u32 = 10_000;

type TtrpcResult<T> = ttrpc::Result<T>;

fn rpc_error(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn agent_error(what: &str, error: ClientError) -> ttrpc::Error {
    let code = error.code().unwrap_or(Code::UNAVAILABLE);
    rpc_error(code, format!("{what}: {error}"))
}

fn internal(what: &str, error: anyhow::Error) -> ttrpc::Error {
    rpc_error(Code::INTERNAL, format!("{what}: {error:#}"))
}

/// Refuses a boot whose kernel or initramfs is missing, naming the setting.
fn check_guest_artifacts(
    config: &Config,
    kind: config::HypervisorKind,
    config_path: Option<&Path>,
) -> TtrpcResult<()> {
    let kernel = match kind {
        config::HypervisorKind::Builtin => ("hypervisor.kernel", &config.hypervisor.kernel),
        _ => ("hypervisor.qemu_kernel", &config.hypervisor.qemu_kernel),
    };
    for (setting, path) in [kernel, ("hypervisor.initrd", &config.hypervisor.initrd)] {
        if !path.is_file() {
            let source = config_path.map_or_else(
                || "the built-in default".to_owned(),
                |p| format!("set in {}", p.display()),
            );
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!(
                    "{setting} = {} is not a readable file ({source}); `make install` installs the guest kernel and initramfs",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// One container: its init process, execs and host-side resources.
struct Container {
    id: String,
    bundle: PathBuf,
    rootfs_mounts: Vec<api::Mount>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    shared: SharedMounts,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                rpc_error(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of container {} does not exist", self.id),
                )
            })
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(
            self.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        all
    }
}

/// The task service; cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    /// The id this shim was started for (the pod's sandbox id).
    shim_id: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        shim_id: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                shim_id: shim_id.to_owned(),
                publisher,
                exit,
                sandbox: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("container {id} does not exist")))
    }

    async fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| rpc_error(Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(error) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            tracing::warn!(%error, topic, "cannot publish an event to containerd");
        }
    }

    /// The pid containerd sees for every task: guest pids mean nothing on
    /// the host, so the process standing for the pod there is the shim.
    fn host_pid() -> u32 {
        std::process::id()
    }

    /// Boots the sandbox for the pod's first container.
    async fn ensure_sandbox(
        &self,
        container_id: &str,
        spec: &oci_spec::runtime::Spec,
        config: &Config,
        config_path: Option<&Path>,
    ) -> TtrpcResult<Arc<Sandbox>> {
        let mut slot = self.inner.sandbox.lock().await;
        if let Some(sandbox) = slot.as_ref() {
            return Ok(sandbox.clone());
        }
        let annotations = spec::annotations(spec);
        let size = config
            .vm_size_for(&annotations)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let host = husk_vmm::host::probe_host_kvm();
        let (kind, reason) = config::resolve_hypervisor(config.hypervisor.kind, &host);
        tracing::info!(
            sandbox_id = %self.inner.shim_id,
            container_id,
            hypervisor = ?kind,
            reason = %reason,
            "hypervisor chosen"
        );
        check_guest_artifacts(config, kind, config_path)?;
        let sandbox_id = spec::sandbox_id_of(container_id, spec);
        let hostname = spec.hostname().clone().unwrap_or_default();
        let (sandbox, watcher) = Sandbox::boot(&sandbox_id, config, kind, size, &hostname)
            .await
            .map_err(|e| internal("cannot start the pod's VM", e))?;
        let sandbox = Arc::new(sandbox);
        *slot = Some(sandbox.clone());
        let service = self.clone();
        tokio::spawn(async move {
            let end = watcher.ended().await;
            service.vm_ended(&end).await;
        });
        let service = self.clone();
        let client = sandbox.client.clone();
        tokio::spawn(async move { service.forward_guest_events(client).await });
        Ok(sandbox)
    }

    /// The VM ended: every process that has not exited is reported exited.
    async fn vm_ended(&self, how: &str) {
        let processes: Vec<Arc<Process>> = self
            .containers()
            .values()
            .flat_map(|c| c.all_processes())
            .collect();
        let unfinished = processes.iter().filter(|p| p.exit().is_none()).count();
        if unfinished > 0 {
            tracing::error!(sandbox_id = %self.inner.shim_id, how, unfinished, "the pod's VM ended under running tasks");
        } else {
            tracing::info!(sandbox_id = %self.inner.shim_id, how, "the pod's VM ended");
        }
        for process in processes {
            if process.lifecycle() == Lifecycle::Created && process.exit().is_none() {
                process.set_exited(Exit::now(VM_GONE_EXIT_STATUS));
                continue;
            }
            self.record_exit(&process, Exit::now(VM_GONE_EXIT_STATUS))
                .await;
        }
    }

    /// Forwards the guest's OOM events to containerd.
    async fn forward_guest_events(&self, client: husk_agent_client::AgentClient) {
        let mut after = 0;
        loop {
            match client.get_events(after, EVENT_POLL_MS).await {
                Ok(events) => {
                    for event in events {
                        after = after.max(event.sequence);
                        if event.has_oom() {
                            let container_id = event.oom().container_id.clone();
                            tracing::warn!(sandbox_id = %self.inner.shim_id, container_id = %container_id, "OOM kill in the guest");
                            self.publish(
                                "/tasks/oom",
                                Box::new(TaskOOM {
                                    container_id,
                                    ..Default::default()
                                }),
                            )
                            .await;
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "guest events ended");
                    return;
                }
            }
        }
    }

    /// Waits for a started process to end in the guest and records it.
    fn spawn_waiter(&self, sandbox: Arc<Sandbox>, process: Arc<Process>) {
        let service = self.clone();
        tokio::spawn(async move {
            let exit = match sandbox
                .client
                .wait_process(&process.container_id, &process.exec_id)
                .await
            {
                Ok(status) => Exit {
                    status: status.status as u32,
                    at_unix_ns: status.exited_at_unix_ns,
                },
                Err(error) => {
                    tracing::warn!(%error, container_id = %process.container_id, exec_id = %process.exec_id, "WaitProcess failed");
                    Exit::now(VM_GONE_EXIT_STATUS)
                }
            };
            service.record_exit(&process, exit).await;
        });
    }

    /// Drains the output, records the exit once and publishes `TaskExit`.
    async fn record_exit(&self, process: &Arc<Process>, exit: Exit) {
        if process.exit().is_some() {
            return;
        }
        if let Some(io) = process.io.lock().await.as_mut() {
            io.wait_output(OUTPUT_DRAIN).await;
        }
        if !process.set_exited(exit) {
            return;
        }
        tracing::info!(
            sandbox_id = %self.inner.shim_id,
            container_id = %process.container_id,
            exec_id = %process.exec_id,
            status = exit.status,
            "process exited"
        );
        let id = if process.exec_id.is_empty() {
            process.container_id.clone()
        } else {
            process.exec_id.clone()
        };
        self.publish(
            "/tasks/exit",
            Box::new(TaskExit {
                container_id: process.container_id.clone(),
                id,
                pid: Self::host_pid(),
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            }),
        )
        .await;
    }

    fn identity(&self, container_id: &str) -> LogIdentity {
        LogIdentity {
            container_id: container_id.to_owned(),
            namespace: self.inner.namespace.clone(),
        }
    }

    async fn create_container(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let id = req.id.clone();
        if self.containers().contains_key(&id) {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(rpc_error(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = spec::read_bundle_spec(&bundle)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
        let explicit_config = options::config_path(req.options.as_ref())
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
        let (config, config_path) = Config::load(explicit_config.as_deref())
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        tracing::info!(
            sandbox_id = %self.inner.shim_id,
            container_id = %id,
            config = %config_path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in defaults".into()),
            "creating container"
        );
        let sandbox = self
            .ensure_sandbox(&id, &spec, &config, config_path.as_deref())
            .await?;
        let result = self.create_in_sandbox(&sandbox, req, &bundle, spec).await;
        if result.is_err() && self.containers().is_empty() {
            // Nothing else runs in the pod: do not keep a VM for nothing.
            self.inner.sandbox.lock().await.take();
            sandbox.destroy().await;
        }
        result
    }

    async fn create_in_sandbox(
        &self,
        sandbox: &Arc<Sandbox>,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        spec: oci_spec::runtime::Spec,
    ) -> TtrpcResult<u32> {
        let id = req.id.as_str();
        let rootfs_source = rootfs::mount_rootfs(bundle, &req.rootfs)
            .map_err(|e| internal("cannot mount the container's rootfs", e))?;
        let mut shared = SharedMounts::default();
        let undo = |shared: &SharedMounts, added_rootfs: bool| {
            let _ = sandbox.with_share(|share| {
                if added_rootfs {
                    let _ = share.remove_container(id);
                }
                for entry in &shared.share_entries {
                    let _ = share.remove_container(entry);
                }
                Ok(())
            });
            if let Some(dir) = &shared.files_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            rootfs::unmount_rootfs(bundle);
        };
        if let Err(error) = sandbox.with_share(|share| {
            share
                .add_container(id, &rootfs_source)
                .map_err(anyhow::Error::from)
        }) {
            undo(&shared, false);
            return Err(internal("cannot share the rootfs with the guest", error));
        }
        let guest_spec = spec::for_guest(
            spec,
            id,
            &sandbox.paths,
            |entry, source| {
                sandbox.with_share(|share| {
                    share.add_container(entry, source)?;
                    Ok(SharedDirectory::rootfs_relative_path(entry)?
                        .to_string_lossy()
                        .into_owned())
                })
            },
            &mut shared,
        );
        let guest_spec = match guest_spec {
            Ok(spec) => spec,
            Err(error) => {
                undo(&shared, true);
                return Err(rpc_error(Code::INVALID_ARGUMENT, format!("{error:#}")));
            }
        };
        let spec_json = serde_json::to_vec(&guest_spec)
            .map_err(|e| internal("cannot encode the spec", e.into()))?;
        let stdio = StdioRequest {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let (streams, io) =
            match ProcessIo::connect(&sandbox.client, &stdio, &self.identity(id)).await {
                Ok(pair) => pair,
                Err(error) => {
                    undo(&shared, true);
                    return Err(internal("cannot connect the container's stdio", error));
                }
            };
        let relative = SharedDirectory::rootfs_relative_path(id)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let request = CreateContainerRequest {
            container_id: id.to_owned(),
            oci_spec_json: spec_json,
            rootfs_path: relative.to_string_lossy().into_owned(),
            stdio: MessageField::some(streams),
            ..Default::default()
        };
        if let Err(error) = sandbox.client.create_container(request).await {
            drop(io);
            undo(&shared, true);
            return Err(agent_error(
                "the guest could not create the container",
                error,
            ));
        }
        let init = Arc::new(Process::new(id, "", stdio, Vec::new()));
        *init.io.lock().await = Some(io);
        let container = Arc::new(Container {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            rootfs_mounts: req.rootfs.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
            shared,
        });
        self.containers().insert(id.to_owned(), container);
        Ok(Self::host_pid())
    }

    /// Removes a container everywhere; errors from a dead guest are
    /// logged, not returned, so `Delete` always cleans the host.
    async fn remove_container(&self, container: &Container) {
        if let Ok(sandbox) = self.sandbox().await {
            if let Err(error) = sandbox
                .client
                .remove_container(&container.id, REMOVE_TIMEOUT_SECS)
                .await
            {
                tracing::warn!(%error, container_id = %container.id, "RemoveContainer failed");
            }
            let _ = sandbox.with_share(|share| {
                if let Err(error) = share.remove_container(&container.id) {
                    tracing::warn!(%error, container_id = %container.id, "cannot remove the rootfs from the share");
                }
                for entry in &container.shared.share_entries {
                    let _ = share.remove_container(entry);
                }
                Ok(())
            });
        }
        if let Some(dir) = &container.shared.files_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if !container.rootfs_mounts.is_empty() {
            rootfs::unmount_rootfs(&container.bundle);
        }
        for process in container.all_processes() {
            process.io.lock().await.take();
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = match self.create_container(&req).await {
            Ok(pid) => pid,
            Err(error) => {
                tracing::error!(sandbox_id = %self.inner.shim_id, container_id = %req.id, %error, "Create failed");
                return Err(error);
            }
        };
        self.publish(
            "/tasks/create",
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.lifecycle() != Lifecycle::Created {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("process {} of {} was already started", req.exec_id, req.id),
            ));
        }
        let sandbox = self.sandbox().await?;
        if req.exec_id.is_empty() {
            let guest_pid = sandbox
                .client
                .start_container(&req.id)
                .await
                .map_err(|e| agent_error("the guest could not start the container", e))?;
            process.set_running(guest_pid);
            tracing::info!(sandbox_id = %self.inner.shim_id, container_id = %req.id, guest_pid, "container started");
            self.publish(
                "/tasks/start",
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid: Self::host_pid(),
                    ..Default::default()
                }),
            )
            .await;
        } else {
            let (streams, io) =
                ProcessIo::connect(&sandbox.client, &process.stdio, &self.identity(&req.id))
                    .await
                    .map_err(|e| internal("cannot connect the exec's stdio", e))?;
            let request = ExecProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                process_json: process.exec_spec_json.clone(),
                stdio: MessageField::some(streams),
                ..Default::default()
            };
            *process.io.lock().await = Some(io);
            let guest_pid = match sandbox.client.exec_process(request).await {
                Ok(pid) => pid,
                Err(error) => {
                    process.io.lock().await.take();
                    return Err(agent_error("the guest could not start the exec", error));
                }
            };
            process.set_running(guest_pid);
            self.publish(
                "/tasks/exec-started",
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: Self::host_pid(),
                    ..Default::default()
                }),
            )
            .await;
        }
        self.spawn_waiter(sandbox, process);
        Ok(api::StartResponse {
            pid: Self::host_pid(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if matches!(process.lifecycle(), Lifecycle::Running | Lifecycle::Paused) {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!(
                    "cannot delete process {:?} of container {}: it is still running",
                    req.exec_id, req.id
                ),
            ));
        }
        let exit = process.exit().unwrap_or_else(|| Exit::now(0));
        if req.exec_id.is_empty() {
            self.remove_container(&container).await;
            self.containers().remove(&req.id);
            tracing::info!(sandbox_id = %self.inner.shim_id, container_id = %req.id, "container deleted");
            self.publish(
                "/tasks/delete",
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid: Self::host_pid(),
                    exit_status: exit.status,
                    exited_at: MessageField::some(exit.timestamp()),
                    id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        } else {
            process.io.lock().await.take();
            container
                .execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.exec_id);
        }
        Ok(api::DeleteResponse {
            pid: Self::host_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.container(&req.id)?;
        let sandbox = self.sandbox().await?;
        let processes = sandbox
            .client
            .list_processes(&req.id)
            .await
            .map_err(|e| agent_error("cannot list the container's processes", e))?;
        Ok(api::PidsResponse {
            processes: processes
                .into_iter()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let sandbox = self.sandbox().await?;
        sandbox
            .client
            .pause_container(&req.id)
            .await
            .map_err(|e| agent_error("cannot pause the container", e))?;
        container.init.set_paused(true);
        self.publish(
            "/tasks/paused",
            Box::new(TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let sandbox = self.sandbox().await?;
        sandbox
            .client
            .resume_container(&req.id)
            .await
            .map_err(|e| agent_error("cannot resume the container", e))?;
        container.init.set_paused(false);
        self.publish(
            "/tasks/resumed",
            Box::new(TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(rpc_error(
            Code::UNIMPLEMENTED,
            "checkpointing a VM-isolated container is not supported",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.exit().is_some() && !req.all {
            return Err(rpc_error(
                Code::NOT_FOUND,
                format!("process {:?} of {} already finished", req.exec_id, req.id),
            ));
        }
        let sandbox = self.sandbox().await?;
        match sandbox
            .client
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await
        {
            Ok(()) => Ok(api::Empty::new()),
            Err(error) if error.code() == Some(Code::NOT_FOUND) => Err(rpc_error(
                Code::NOT_FOUND,
                format!("process {:?} of {} already finished", req.exec_id, req.id),
            )),
            Err(error) => Err(agent_error("cannot signal the process", error)),
        }
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        if container.init.exit().is_some() {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec_json = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        let stdio = StdioRequest {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    format!("exec {} of {} already exists", req.exec_id, req.id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Process::new(&req.id, &req.exec_id, stdio, spec_json)),
            );
        }
        self.publish(
            "/tasks/exec-added",
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        container.process(&req.exec_id)?;
        let sandbox = self.sandbox().await?;
        sandbox
            .client
            .tty_win_resize(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|e| agent_error("cannot resize the terminal", e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if req.stdin {
            if let Some(io) = process.io.lock().await.as_ref() {
                io.close_stdin();
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|any| String::from_utf8_lossy(&any.value).into_owned())
            .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "update without resources"))?;
        let sandbox = self.sandbox().await?;
        sandbox
            .client
            .update_container(&req.id, &resources)
            .await
            .map_err(|e| agent_error("cannot update the container's resources", e))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.container(&req.id)?;
        let sandbox = self.sandbox().await?;
        let stats = sandbox
            .client
            .stats_container(&req.id)
            .await
            .map_err(|e| agent_error("cannot read the container's statistics", e))?;
        let metrics = metrics::cgroup_v1_metrics(&stats);
        let any = convert_to_any(Box::new(metrics))
            .map_err(|e| internal("cannot encode the statistics", anyhow::anyhow!("{e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let exit = process.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.to_string_lossy().into_owned(),
            pid: Self::host_pid(),
            status: process.lifecycle().status().into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| e.timestamp()).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: Self::host_pid(),
            version: format!("husk {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let remaining = self.containers().len();
        if remaining > 0 {
            tracing::info!(sandbox_id = %self.inner.shim_id, remaining, "Shutdown ignored: containers remain");
            return Ok(api::Empty::new());
        }
        let sandbox = self.inner.sandbox.lock().await.take();
        if let Some(sandbox) = sandbox {
            sandbox.destroy().await;
        }
        tracing::info!(sandbox_id = %self.inner.shim_id, "shim shutting down");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}
