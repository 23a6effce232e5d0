//! The containerd task service (task API v2) of one pod. Each RPC decodes
//! its request, makes one call on the [`Pod`] model, and publishes the
//! RPC's event; the pod's logic, host resources and VM live behind it.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskIO, TaskPaused, TaskResumed,
};
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::ProcessInfo;

use crate::events::{ContainerdEvents, EventSink};
use crate::hypervisor::BackendLauncher;
use crate::metrics;
use crate::options;
use crate::paths;
use crate::pod::{NewContainer, Pod, PodError};
use crate::stdio::StdioRequest;

type TtrpcResult<T> = ttrpc::Result<T>;

fn rpc_error(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn status(error: PodError) -> ttrpc::Error {
    rpc_error(error.code(), error.to_string())
}

/// The task service; cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    pod: Pod,
    events: Arc<dyn EventSink>,
    exit: Arc<ExitSignal>,
    shim_id: String,
}

impl TaskService {
    /// The service of the product: VMs from the configured backend, events
    /// to containerd.
    pub fn new(
        namespace: &str,
        shim_id: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let events: Arc<dyn EventSink> = Arc::new(ContainerdEvents::new(publisher, namespace));
        let pod = Pod::new(
            shim_id,
            namespace,
            &paths::run_root(),
            Arc::new(BackendLauncher),
            events.clone(),
        );
        Self {
            pod,
            events,
            exit,
            shim_id: shim_id.to_owned(),
        }
    }

    async fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event).await;
    }
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioRequest {
    StdioRequest {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

fn exit_fields(
    exit: crate::pod::process::Exit,
) -> (
    u32,
    MessageField<containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp>,
) {
    (exit.status, MessageField::some(exit.timestamp()))
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(rpc_error(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported",
            ));
        }
        let config_path = options::config_path(req.options.as_ref())
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
        let request = NewContainer {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req.rootfs.clone(),
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            config_path,
        };
        if let Err(error) = self.pod.create(request).await {
            tracing::error!(sandbox_id = %self.shim_id, container_id = %req.id, %error, "Create failed");
            return Err(status(error));
        }
        let pid = Pod::host_pid();
        let event = TaskCreate {
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
        };
        self.publish("/tasks/create", Box::new(event)).await;
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
        self.pod
            .start(&req.id, &req.exec_id)
            .await
            .map_err(status)?;
        Ok(api::StartResponse {
            pid: Pod::host_pid(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let exit = self
            .pod
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(status)?;
        let (exit_status, exited_at) = exit_fields(exit);
        if req.exec_id.is_empty() {
            let event = TaskDelete {
                container_id: req.id.clone(),
                pid: Pod::host_pid(),
                exit_status,
                exited_at: exited_at.clone(),
                id: req.id.clone(),
                ..Default::default()
            };
            self.publish("/tasks/delete", Box::new(event)).await;
        }
        Ok(api::DeleteResponse {
            pid: Pod::host_pid(),
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.pod.pids(&req.id).await.map_err(status)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pod.set_paused(&req.id, true).await.map_err(status)?;
        let event = TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish("/tasks/paused", Box::new(event)).await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.pod.set_paused(&req.id, false).await.map_err(status)?;
        let event = TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish("/tasks/resumed", Box::new(event)).await;
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
        self.pod
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let process_json = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        let stdio = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        self.pod
            .add_exec(&req.id, &req.exec_id, stdio, process_json)
            .map_err(status)?;
        let event = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish("/tasks/exec-added", Box::new(event)).await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.pod
            .resize_pty(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        self.pod
            .close_io(&req.id, &req.exec_id, req.stdin)
            .await
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|any| String::from_utf8_lossy(&any.value).into_owned())
            .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "update without resources"))?;
        self.pod.update(&req.id, &resources).await.map_err(status)?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exit = self.pod.wait(&req.id, &req.exec_id).await.map_err(status)?;
        let (exit_status, exited_at) = exit_fields(exit);
        Ok(api::WaitResponse {
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.pod.stats(&req.id).await.map_err(status)?;
        let any = convert_to_any(Box::new(metrics::cgroup_v1_metrics(&stats)))
            .map_err(|e| rpc_error(Code::INTERNAL, format!("cannot encode the statistics: {e}")))?;
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
        let state = self.pod.state(&req.id, &req.exec_id).map_err(status)?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: state.bundle.to_string_lossy().into_owned(),
            pid: Pod::host_pid(),
            status: state.lifecycle.status().into(),
            stdin: state.stdio.stdin,
            stdout: state.stdio.stdout,
            stderr: state.stdio.stderr,
            terminal: state.stdio.terminal,
            exit_status: state.exit.map_or(0, |e| e.status),
            exited_at: state.exit.map(|e| e.timestamp()).into(),
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
            task_pid: Pod::host_pid(),
            version: format!("husk {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.pod.shutdown().await {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
