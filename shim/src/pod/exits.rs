//! Processes in motion: starting inits and execs, signalling them, and
//! learning how they ended. Every started process gets a waiter on the
//! agent's `WaitProcess`; the VM's end counts as the end of every process
//! still running. Either way the exit is recorded once, after its output
//! drained, and published as `/tasks/exit`. Because the order of a
//! process's events matters to containerd, the start and exit events are
//! published here, not by the task service.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::events::task::{TaskExecStarted, TaskExit, TaskOOM, TaskStart};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::ttrpc::Code;
use husk_agent_client::agent::ExecProcessRequest;
use husk_agent_client::AgentClient;

use super::process::{Exit, Lifecycle, Process};
use super::{Pod, PodError};
use crate::sandbox::Sandbox;
use crate::stdio::{ProcessIo, StdioRequest};

/// How long a process's output may keep flowing after its exit is known.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Exit status reported for processes whose VM ended under them.
pub const VM_GONE_EXIT_STATUS: u32 = 255;
/// Long-poll period for guest events.
const EVENT_POLL_MS: u32 = 10_000;
/// The least time between two OOM events published for one container: an
/// OOM kill is news once; a guest repeating it cannot flood containerd.
pub const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the event forwarder waits after a failed poll.
const EVENT_RETRY_DELAY: Duration = Duration::from_millis(500);

impl Pod {
    /// Starts a created init or exec; returns its guest pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, PodError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if process.lifecycle() != Lifecycle::Created {
            return Err(PodError::FailedPrecondition(format!(
                "process {exec_id} of {id} was already started"
            )));
        }
        let sandbox = self.sandbox().await?;
        let guest_pid = if exec_id.is_empty() {
            sandbox
                .client
                .start_container(id)
                .await
                .map_err(PodError::agent("the guest could not start the container"))?
        } else {
            self.start_exec(&sandbox, &process).await?
        };
        process.set_running(guest_pid);
        if exec_id.is_empty() {
            tracing::info!(sandbox_id = %self.inner.shim_id, container_id = %id, guest_pid, "container started");
            sandbox.container_started();
        } else {
            tracing::info!(sandbox_id = %self.inner.shim_id, container_id = %id, exec_id, guest_pid, "exec started");
        }
        // Published here, before the waiter exists, so a process that ends
        // at once still has its start announced before its exit.
        self.publish_started(id, exec_id).await;
        self.spawn_waiter(sandbox, process);
        Ok(guest_pid)
    }

    async fn publish_started(&self, id: &str, exec_id: &str) {
        if exec_id.is_empty() {
            let event = TaskStart {
                container_id: id.to_owned(),
                pid: Self::host_pid(),
                ..Default::default()
            };
            self.inner
                .events
                .publish("/tasks/start", Box::new(event))
                .await;
        } else {
            let event = TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid: Self::host_pid(),
                ..Default::default()
            };
            self.inner
                .events
                .publish("/tasks/exec-started", Box::new(event))
                .await;
        }
    }

    async fn start_exec(&self, sandbox: &Sandbox, process: &Process) -> Result<u32, PodError> {
        let id = &process.container_id;
        let (streams, io) =
            ProcessIo::connect(&sandbox.client, &process.stdio, &self.identity(sandbox, id))
                .await
                .map_err(PodError::internal("cannot connect the exec's stdio"))?;
        let request = ExecProcessRequest {
            container_id: id.clone(),
            exec_id: process.exec_id.clone(),
            process_json: process.exec_spec_json.clone(),
            stdio: MessageField::some(streams),
            ..Default::default()
        };
        *process.io.lock().await = Some(io);
        match sandbox.client.exec_process(request).await {
            Ok(pid) => Ok(pid),
            Err(error) => {
                process.io.lock().await.take();
                Err(PodError::agent("the guest could not start the exec")(error))
            }
        }
    }

    /// Adds an exec to a running container (started later by `start`).
    pub fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioRequest,
        process_json: Vec<u8>,
    ) -> Result<(), PodError> {
        let container = self.container(id)?;
        if container.init.exit().is_some() {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        container.add_exec(Process::new(id, exec_id, stdio, process_json))
    }

    /// Signals a process (`all`: every process of the container). A
    /// finished process is NOT_FOUND, as containerd expects.
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError> {
        let process = self.process(id, exec_id)?;
        let finished =
            || PodError::NotFound(format!("process {exec_id:?} of {id} already finished"));
        if process.exit().is_some() && !all {
            return Err(finished());
        }
        let sandbox = self.sandbox().await?;
        match sandbox
            .client
            .signal_process(id, exec_id, signal, all)
            .await
        {
            Ok(()) => Ok(()),
            Err(error) if error.code() == Some(Code::NOT_FOUND) => Err(finished()),
            Err(error) => Err(PodError::agent("cannot signal the process")(error)),
        }
    }

    /// Waits for a process to end.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, PodError> {
        Ok(self.process(id, exec_id)?.wait().await)
    }

    /// Waits for a started process to end in the guest and records it.
    fn spawn_waiter(&self, sandbox: Arc<Sandbox>, process: Arc<Process>) {
        let pod = self.clone();
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
            pod.record_exit(&process, exit).await;
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
        let event = TaskExit {
            container_id: process.container_id.clone(),
            id,
            pid: Self::host_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        };
        self.inner
            .events
            .publish("/tasks/exit", Box::new(event))
            .await;
    }

    /// The VM ended: every process that has not exited is reported exited.
    pub(super) async fn vm_ended(&self, how: &str) {
        let processes: Vec<Arc<Process>> = self
            .inner
            .containers
            .all()
            .iter()
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

    /// Forwards the guest's OOM events to containerd. The guest is not
    /// trusted: an event is published only for a container of this pod,
    /// at most once per [`OOM_EVENT_INTERVAL`] per container. A failed poll
    /// is retried after [`EVENT_RETRY_DELAY`] for as long as the pod's VM
    /// runs.
    pub(super) async fn forward_guest_events(&self, client: AgentClient) {
        let mut after = 0;
        let mut last_published: HashMap<String, Instant> = HashMap::new();
        loop {
            let events = match client.get_events(after, EVENT_POLL_MS).await {
                Ok(events) => events,
                Err(error) => {
                    if self.current_sandbox().is_none() {
                        tracing::debug!(%error, "guest events ended with the VM");
                        return;
                    }
                    tracing::debug!(%error, "guest events failed; polling again");
                    tokio::time::sleep(EVENT_RETRY_DELAY).await;
                    continue;
                }
            };
            for event in events {
                after = after.max(event.sequence);
                if !event.has_oom() {
                    continue;
                }
                let container_id = event.oom().container_id.clone();
                if let Some(event) = self.accept_oom(&container_id, &mut last_published) {
                    self.inner
                        .events
                        .publish("/tasks/oom", Box::new(event))
                        .await;
                }
            }
        }
    }

    /// The OOM event to publish for `container_id`, if it is one of this
    /// pod's containers and none was published for it just before.
    fn accept_oom(
        &self,
        container_id: &str,
        last_published: &mut HashMap<String, Instant>,
    ) -> Option<TaskOOM> {
        if self.container(container_id).is_err() {
            self.inner
                .dropped_guest_events
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let now = Instant::now();
        if last_published
            .get(container_id)
            .is_some_and(|at| now.duration_since(*at) < OOM_EVENT_INTERVAL)
        {
            self.inner
                .dropped_guest_events
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        last_published.insert(container_id.to_owned(), now);
        tracing::warn!(sandbox_id = %self.inner.shim_id, container_id, "OOM kill in the guest");
        Some(TaskOOM {
            container_id: container_id.to_owned(),
            ..Default::default()
        })
    }

    /// Guest events refused so far (foreign ids, repeats).
    pub fn dropped_guest_events(&self) -> u64 {
        self.inner.dropped_guest_events.load(Ordering::Relaxed)
    }
}
