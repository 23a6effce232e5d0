//! The sandbox: the containers of the pod and the processes in them. The
//! RPC layer calls these methods; they validate what the host sent, drive
//! the runtime crate (through the helper for create and exec), and keep the
//! process table the reaper reports into.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_protocols::agent::{
    ConfigureNetworkRequest, ContainerMetrics, CreateContainerRequest, CreateSandboxRequest,
    ExecProcessRequest, GuestMetrics, ProcessInfo, StatsContainerResponse,
};
use husk_runtime::Container;
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxResources, Process as OciProcess};

use crate::error::{AgentError, Result};
use crate::events::EventLog;
use crate::helper::{self, HelperRequest};
use crate::process::{prepare_io, OnExit, Process};
use crate::reaper::Reaper;
use crate::stdio::StreamRegistry;
use crate::{guest, guest_spec, network, pod_namespaces, resources, validate};

/// How long RemoveContainer waits for the container's processes when the
/// host gives no timeout.
const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent keeps its state and finds the share.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The shared directory (virtio-fs mount point in the guest).
    pub share_dir: PathBuf,
    /// Runtime state and generated bundles.
    pub state_dir: PathBuf,
    /// Host test mode: no virtio-fs mount, no guest-wide changes.
    pub test_mode: bool,
}

impl AgentConfig {
    fn runtime_root(&self) -> PathBuf {
        self.state_dir.join("runtime")
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("bundles").join(id)
    }
}

/// One container.
struct ContainerEntry {
    init: Arc<Process>,
    /// OOM kills in the container's cgroup, checked at each process exit.
    oom: Arc<resources::OomWatch>,
    /// The task following `memory.events` (cgroup v2).
    oom_follower: Option<tokio::task::JoinHandle<()>>,
    /// Exec processes by exec id; `None` while an exec is being started.
    execs: Mutex<HashMap<String, Option<Arc<Process>>>>,
}

impl Drop for ContainerEntry {
    fn drop(&mut self) {
        if let Some(follower) = self.oom_follower.take() {
            follower.abort();
        }
    }
}

/// Publishes `new` OOM kills of `container_id` as events.
fn oom_reporter(events: EventLog, container_id: String) -> impl Fn(u64) + Send + Sync + 'static {
    move |new| {
        for _ in 0..new {
            tracing::warn!(container = %container_id, "OOM kill in container");
            events.oom_killed(&container_id);
        }
    }
}

/// A slot in the container table: reserved while being created.
enum Slot {
    Creating,
    Ready(Arc<ContainerEntry>),
}

/// The sandbox's state.
pub struct Sandbox {
    config: AgentConfig,
    reaper: Reaper,
    events: EventLog,
    streams: StreamRegistry,
    sandbox_id: Mutex<Option<String>>,
    containers: Mutex<HashMap<String, Slot>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sandbox {
    pub fn new(
        config: AgentConfig,
        reaper: Reaper,
        events: EventLog,
        streams: StreamRegistry,
    ) -> Self {
        Self {
            config,
            reaper,
            events,
            streams,
            sandbox_id: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        }
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    // ---- sandbox ----------------------------------------------------------

    pub fn create_sandbox(&self, request: &CreateSandboxRequest) -> Result<()> {
        validate::id("sandbox", &request.sandbox_id)?;
        let mut current = lock(&self.sandbox_id);
        if let Some(existing) = current.as_ref() {
            return Err(AgentError::AlreadyExists {
                kind: "sandbox",
                id: existing.clone(),
            });
        }
        guest::set_up_sandbox(&self.config, request)?;
        tracing::info!(sandbox = %request.sandbox_id, "sandbox created");
        *current = Some(request.sandbox_id.clone());
        Ok(())
    }

    /// The pid of the pod's sandbox container's init, whose network
    /// namespace is the pod's.
    pub fn pod_network_pid(&self) -> Result<i32> {
        let sandbox_id = lock(&self.sandbox_id)
            .clone()
            .ok_or_else(|| AgentError::FailedPrecondition("no sandbox was created yet".into()))?;
        match lock(&self.containers).get(&sandbox_id) {
            Some(Slot::Ready(entry)) if entry.init.exited().is_none() => Ok(entry.init.pid),
            _ => Err(AgentError::FailedPrecondition(format!(
                "the pod's sandbox container {sandbox_id} is not running: its network \
                 namespace is the pod's"
            ))),
        }
    }

    /// Configures the pod's network in the sandbox container's network
    /// namespace (see `network`).
    pub async fn configure_network(&self, request: &ConfigureNetworkRequest) -> Result<()> {
        if lock(&self.sandbox_id).is_none() {
            return Err(AgentError::FailedPrecondition(
                "CreateSandbox must come before ConfigureNetwork".into(),
            ));
        }
        let pid = self.pod_network_pid()?;
        network::configure(request, pid).await?;
        tracing::info!(
            interfaces = request.interfaces.len(),
            routes = request.routes.len(),
            "the pod's network is configured"
        );
        Ok(())
    }

    /// Removes every container and the sandbox's cgroup; the caller then
    /// ends the VM (or, in test mode, the agent).
    pub async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<()> {
        let current = lock(&self.sandbox_id).clone();
        if current.as_deref() != Some(sandbox_id) {
            return Err(AgentError::FailedPrecondition(format!(
                "no sandbox {sandbox_id:?} (current: {current:?})"
            )));
        }
        self.remove_all_containers().await;
        if let Ok(cgroups) = husk_runtime::cgroups::CgroupPaths::for_container(
            Some(Path::new(&format!("husk-{sandbox_id}"))),
            sandbox_id,
        ) {
            let _ = cgroups.destroy();
        }
        guest::tear_down_sandbox(&self.config);
        tracing::info!(sandbox = %sandbox_id, "sandbox destroyed");
        Ok(())
    }

    /// Kills and removes every container (sandbox teardown, agent exit).
    pub async fn remove_all_containers(&self) {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for id in ids {
            if let Err(error) = self.remove_container(&id, DEFAULT_REMOVE_TIMEOUT).await {
                tracing::warn!(container = %id, %error, "removing at teardown failed");
            }
        }
    }

    /// Sends `signal` to every container init (signal forwarding).
    pub fn signal_all_inits(&self, signal: Signal) {
        for slot in lock(&self.containers).values() {
            if let Slot::Ready(entry) = slot {
                if entry.init.exited().is_none() {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(entry.init.pid), signal);
                }
            }
        }
    }

    // ---- containers -------------------------------------------------------

    fn container(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        validate::id("container", id)?;
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(entry)) => Ok(entry.clone()),
            _ => Err(AgentError::ContainerNotFound(id.to_owned())),
        }
    }

    fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let entry = self.container(container_id)?;
        if exec_id.is_empty() {
            return Ok(entry.init.clone());
        }
        validate::id("exec", exec_id)?;
        let found = lock(&entry.execs).get(exec_id).cloned().flatten();
        found.ok_or_else(|| AgentError::ProcessNotFound {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
        })
    }

    fn load(&self, id: &str) -> Result<Container> {
        Container::load(self.config.runtime_root(), id).map_err(|source| AgentError::Runtime {
            id: id.to_owned(),
            op: "load",
            source,
        })
    }

    pub async fn create_container(&self, request: &CreateContainerRequest) -> Result<()> {
        let id = request.container_id.clone();
        validate::id("container", &id)?;
        let sandbox_id = lock(&self.sandbox_id).clone().ok_or_else(|| {
            AgentError::FailedPrecondition("CreateSandbox must come before CreateContainer".into())
        })?;
        {
            let mut containers = lock(&self.containers);
            if containers.contains_key(&id) {
                return Err(AgentError::AlreadyExists {
                    kind: "container",
                    id,
                });
            }
            containers.insert(id.clone(), Slot::Creating);
        }
        let result = self.create_container_reserved(request, &sandbox_id).await;
        let mut containers = lock(&self.containers);
        match result {
            Ok(entry) => {
                containers.insert(id.clone(), Slot::Ready(entry));
                tracing::info!(container = %id, "container created");
                Ok(())
            }
            Err(error) => {
                containers.remove(&id);
                let _ = std::fs::remove_dir_all(self.config.bundle_dir(&id));
                Err(error)
            }
        }
    }

    async fn create_container_reserved(
        &self,
        request: &CreateContainerRequest,
        sandbox_id: &str,
    ) -> Result<Arc<ContainerEntry>> {
        let id = &request.container_id;
        let stdio = request.stdio.clone().unwrap_or_default();
        let mut spec = guest_spec::for_guest(
            &request.oci_spec_json,
            &self.config.share_dir,
            &request.rootfs_path,
            guest_spec::cgroup_path(sandbox_id, id),
            stdio.terminal,
        )?;
        let sandbox_container = match lock(&self.containers).get(sandbox_id) {
            Some(Slot::Ready(entry)) => {
                Some(entry.init.exited().is_none().then_some(entry.init.pid))
            }
            _ => None,
        };
        pod_namespaces::resolve(
            &mut spec,
            id,
            sandbox_container.map(|running_pid| pod_namespaces::SandboxContainer {
                id: sandbox_id,
                running_pid,
            }),
        )?;
        let bundle = self.config.bundle_dir(id);
        std::fs::create_dir_all(&bundle).map_err(AgentError::io("create", &bundle))?;
        let config_path = bundle.join("config.json");
        let spec_text = serde_json::to_vec(&spec)
            .map_err(|e| AgentError::InvalidRequest(format!("OCI spec: {e}")))?;
        std::fs::write(&config_path, spec_text).map_err(AgentError::io("write", &config_path))?;
        let (child_io, io) = prepare_io(&self.streams, &stdio).await?;
        let helper_request = HelperRequest::Create {
            root: self.config.runtime_root(),
            id: id.clone(),
            bundle,
            terminal: stdio.terminal,
        };
        let pid = helper::run(&self.reaper, helper_request, child_io).await?;
        let exit = self.reaper.watch(pid);
        let oom = Arc::new(resources::OomWatch::new(&self.load(id)?));
        let on_exit = self.report_oom_kills(id, &oom);
        let init = Process::follow(id, "", pid, io, exit, self.events.clone(), on_exit).await?;
        let oom_follower = oom.follow(oom_reporter(self.events.clone(), id.clone()));
        Ok(Arc::new(ContainerEntry {
            init,
            oom,
            oom_follower,
            execs: Mutex::new(HashMap::new()),
        }))
    }

    /// What a process exit of container `id` triggers: an `OomKilled`
    /// event for each OOM kill its cgroup counted since the last report, so
    /// the event comes before the exit that the kill caused.
    fn report_oom_kills(&self, id: &str, oom: &Arc<resources::OomWatch>) -> OnExit {
        let oom = oom.clone();
        let report = oom_reporter(self.events.clone(), id.to_owned());
        Box::new(move |_| oom.report_new_kills(report))
    }

    pub async fn start_container(&self, id: &str) -> Result<u32> {
        let entry = self.container(id)?;
        let container = self.load(id)?;
        let id_owned = id.to_owned();
        tokio::task::spawn_blocking(move || container.start())
            .await
            .map_err(|e| AgentError::InvalidRequest(e.to_string()))?
            .map_err(|source| AgentError::Runtime {
                id: id_owned,
                op: "start",
                source,
            })?;
        tracing::info!(container = %id, pid = entry.init.pid, "container started");
        Ok(entry.init.pid as u32)
    }

    pub async fn remove_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let entry = self.container(id)?;
        if entry.init.exited().is_none() {
            if let Ok(container) = self.load(id) {
                let _ = container.kill(Signal::SIGKILL, true);
            }
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(entry.init.pid), Signal::SIGKILL);
            if tokio::time::timeout(timeout, entry.init.wait())
                .await
                .is_err()
            {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id} did not stop within {} s after SIGKILL",
                    timeout.as_secs()
                )));
            }
        }
        let execs: Vec<Arc<Process>> = lock(&entry.execs).values().flatten().cloned().collect();
        for exec in execs {
            let _ = tokio::time::timeout(timeout, exec.wait()).await;
        }
        let container = self.load(id)?;
        let id_owned = id.to_owned();
        tokio::task::spawn_blocking(move || container.delete(true))
            .await
            .map_err(|e| AgentError::InvalidRequest(e.to_string()))?
            .map_err(|source| AgentError::Runtime {
                id: id_owned,
                op: "delete",
                source,
            })?;
        let bundle = self.config.bundle_dir(id);
        let _ = std::fs::remove_dir_all(&bundle);
        lock(&self.containers).remove(id);
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    pub fn update_container(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        self.container(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| AgentError::InvalidRequest(format!("LinuxResources: {e}")))?;
        resources::check_satisfiable(&resources)?;
        let container = self.load(id)?;
        container
            .record()
            .cgroups
            .apply(&resources)
            .map_err(|source| AgentError::Runtime {
                id: id.to_owned(),
                op: "update resources",
                source,
            })
    }

    pub fn pause_container(&self, id: &str) -> Result<()> {
        self.container(id)?;
        self.load(id)?
            .pause()
            .map_err(|source| AgentError::Runtime {
                id: id.to_owned(),
                op: "pause",
                source,
            })
    }

    pub fn resume_container(&self, id: &str) -> Result<()> {
        self.container(id)?;
        self.load(id)?
            .resume()
            .map_err(|source| AgentError::Runtime {
                id: id.to_owned(),
                op: "resume",
                source,
            })
    }

    pub fn stats_container(&self, id: &str) -> Result<StatsContainerResponse> {
        self.container(id)?;
        Ok(resources::stats(&self.load(id)?))
    }

    /// The guest's figures and those of every ready container whose
    /// cgroup could be read (`GetGuestMetrics`).
    pub fn guest_metrics(&self) -> GuestMetrics {
        let mut metrics = crate::guest_metrics::read_guest();
        let ids: Vec<String> = lock(&self.containers)
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready(_)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Ok(container) = self.load(&id) {
                metrics.containers.push(ContainerMetrics {
                    container_id: id,
                    stats: protobuf::MessageField::some(resources::stats(&container)),
                    ..Default::default()
                });
            }
        }
        metrics
    }

    /// Starts the debug console's shell server (`StartDebugConsole`).
    pub fn start_debug_console(&self) -> Result<String> {
        crate::debug_console::start(&self.config)
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        self.container(id)?;
        Ok(self
            .load(id)?
            .pids()
            .into_iter()
            .map(|pid| ProcessInfo {
                pid: pid as u32,
                command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect())
    }

    // ---- processes --------------------------------------------------------

    pub async fn exec_process(&self, request: &ExecProcessRequest) -> Result<u32> {
        let entry = self.container(&request.container_id)?;
        validate::id("exec", &request.exec_id)?;
        {
            let mut execs = lock(&entry.execs);
            if execs.contains_key(&request.exec_id) {
                return Err(AgentError::AlreadyExists {
                    kind: "exec",
                    id: request.exec_id.clone(),
                });
            }
            execs.insert(request.exec_id.clone(), None);
        }
        let result = self.exec_reserved(request, &entry).await;
        let mut execs = lock(&entry.execs);
        match result {
            Ok(process) => {
                let pid = process.pid as u32;
                execs.insert(request.exec_id.clone(), Some(process));
                Ok(pid)
            }
            Err(error) => {
                execs.remove(&request.exec_id);
                Err(error)
            }
        }
    }

    async fn exec_reserved(
        &self,
        request: &ExecProcessRequest,
        entry: &ContainerEntry,
    ) -> Result<Arc<Process>> {
        let process: OciProcess = serde_json::from_slice(&request.process_json)
            .map_err(|e| AgentError::InvalidRequest(format!("OCI process: {e}")))?;
        let stdio = request.stdio.clone().unwrap_or_default();
        if process.terminal().unwrap_or(false) != stdio.terminal {
            return Err(AgentError::InvalidRequest(format!(
                "process.terminal is {} but the stdio streams say terminal={}",
                process.terminal().unwrap_or(false),
                stdio.terminal
            )));
        }
        let (child_io, io) = prepare_io(&self.streams, &stdio).await?;
        let helper_request = HelperRequest::Exec {
            root: self.config.runtime_root(),
            id: request.container_id.clone(),
            process: Box::new(process),
            terminal: stdio.terminal,
        };
        let pid = helper::run(&self.reaper, helper_request, child_io).await?;
        let exit = self.reaper.watch(pid);
        tracing::info!(container = %request.container_id, exec = %request.exec_id, pid, "exec started");
        Process::follow(
            &request.container_id,
            &request.exec_id,
            pid,
            io,
            exit,
            self.events.clone(),
            self.report_oom_kills(&request.container_id, &entry.oom),
        )
        .await
    }

    pub fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let process = self.process(container_id, exec_id)?;
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| AgentError::InvalidRequest(format!("unknown signal {signal}")))?;
        if process.exited().is_some() {
            return Err(AgentError::ProcessExited {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
            });
        }
        if all {
            return self
                .load(container_id)?
                .kill(signal, true)
                .map_err(|source| AgentError::Runtime {
                    id: container_id.to_owned(),
                    op: "signal",
                    source,
                });
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(process.pid), signal) {
            Ok(()) => Ok(()),
            // Reaped between the check above and the kill, its exit not yet
            // recorded: it is gone, as the check would have said a moment
            // later.
            Err(nix::errno::Errno::ESRCH) => Err(AgentError::ProcessExited {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
            }),
            Err(e) => Err(AgentError::io("signal", format!("pid {}", process.pid))(
                e.into(),
            )),
        }
    }

    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<crate::reaper::Exit> {
        Ok(self.process(container_id, exec_id)?.wait().await)
    }

    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        self.process(container_id, exec_id)?.close_stdin();
        Ok(())
    }

    pub fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<()> {
        self.process(container_id, exec_id)?.resize(rows, columns)
    }
}
