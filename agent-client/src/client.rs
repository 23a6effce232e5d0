//! The typed agent API: one async method per RPC, errors as
//! [`ClientError`] with the method name and the agent's status code.

use std::time::{Duration, Instant};

use husk_protocols::agent::*;
use husk_protocols::agent_ttrpc;
use husk_protocols::stdio::{is_valid_stream_id, preamble};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::{ClientError, Endpoint};

/// How long an ordinary call may take before the client gives up, unless
/// [`AgentClient::with_call_timeout`] says otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one readiness probe (`Check`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between connection attempts while the agent is not up yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// How a process ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The code, or 128 + the signal that killed it.
    pub status: i32,
    /// Unix time of the exit, nanoseconds.
    pub exited_at_unix_ns: i64,
}

/// Told how long each call took (the shim's RPC latency histogram).
/// Called once per completed or failed call with the method's name.
pub type CallObserver = std::sync::Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

/// A connected client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    rpc: agent_ttrpc::AgentClient,
    /// The deadline of every call but the long waits (`WaitProcess`, and
    /// `GetEvents` beyond its own wait): a hung guest cannot hold a caller
    /// longer than this.
    call_timeout: Duration,
    /// Told every call's duration, if set.
    observer: Option<CallObserver>,
}

fn context(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_duration(t),
        // Zero means no deadline to ttrpc: for calls that wait on the guest.
        None => ttrpc::context::with_timeout(0),
    }
}

macro_rules! call {
    ($self:ident, $method:ident, $name:literal, $req:expr) => {
        call!($self, $method, $name, $req, Some($self.call_timeout))
    };
    ($self:ident, $method:ident, $name:literal, $req:expr, $timeout:expr) => {{
        let started = Instant::now();
        let result = $self
            .rpc
            .$method(context($timeout), &$req)
            .await
            .map_err(|e| ClientError::from_ttrpc($name, e));
        if let Some(observer) = $self.observer.as_ref() {
            observer($name, started.elapsed());
        }
        result
    }};
}

fn container_request(container_id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: container_id.to_owned(),
        ..Default::default()
    }
}

fn process_request(container_id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

impl AgentClient {
    /// Connects to the agent at `endpoint`, retrying until it answers
    /// `Check` as serving or `deadline` has passed.
    pub async fn connect(endpoint: Endpoint, deadline: Duration) -> Result<Self, ClientError> {
        let started = Instant::now();
        loop {
            let last_error = match Self::try_connect(&endpoint).await {
                Ok(client) => return Ok(client),
                Err(error) => error.to_string(),
            };
            if started.elapsed() + RETRY_INTERVAL > deadline {
                return Err(ClientError::NotReady {
                    endpoint: endpoint.to_string(),
                    waited_ms: started.elapsed().as_millis(),
                    last_error,
                });
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    async fn try_connect(endpoint: &Endpoint) -> Result<Self, ClientError> {
        let stream = endpoint.connect_api().await?;
        let ttrpc_client =
            ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(stream));
        let client = Self {
            endpoint: endpoint.clone(),
            rpc: agent_ttrpc::AgentClient::new(ttrpc_client),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            observer: None,
        };
        let health = call!(client, check, "Check", Empty::new(), Some(PROBE_TIMEOUT))?;
        if health.status.value() == health_check_response::ServingStatus::SERVING as i32 {
            Ok(client)
        } else {
            Err(ClientError::Rpc {
                method: "Check",
                code: ttrpc::Code::UNAVAILABLE,
                message: format!("agent is {:?}", health.status),
            })
        }
    }

    /// The same connection with another deadline for ordinary calls.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The same connection, telling `observer` how long each call took.
    pub fn with_call_observer(mut self, observer: CallObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The deadline of ordinary calls.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The generated ttrpc client, for calls this type does not wrap.
    pub fn raw(&self) -> &agent_ttrpc::AgentClient {
        &self.rpc
    }

    /// Opens a stdio stream to the agent and announces it as `id`; name
    /// `id` in `StdioStreams` afterwards. Write to it for stdin, read from it
    /// for output; shut its write side down to close the process's stdin.
    pub async fn open_stdio(&self, id: &str) -> Result<UnixStream, ClientError> {
        if !is_valid_stream_id(id) {
            return Err(ClientError::InvalidStreamId(id.to_owned()));
        }
        let mut stream = self.endpoint.connect_stdio().await?;
        stream
            .write_all(preamble(id).as_bytes())
            .await
            .map_err(|source| ClientError::Preamble {
                id: id.to_owned(),
                source,
            })?;
        Ok(stream)
    }

    pub async fn create_sandbox(&self, request: CreateSandboxRequest) -> Result<(), ClientError> {
        call!(self, create_sandbox, "CreateSandbox", request).map(drop)
    }

    pub async fn configure_network(
        &self,
        request: ConfigureNetworkRequest,
    ) -> Result<(), ClientError> {
        call!(self, configure_network, "ConfigureNetwork", request).map(drop)
    }

    pub async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        let request = DestroySandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            ..Default::default()
        };
        call!(self, destroy_sandbox, "DestroySandbox", request).map(drop)
    }

    pub async fn create_container(
        &self,
        request: CreateContainerRequest,
    ) -> Result<(), ClientError> {
        call!(self, create_container, "CreateContainer", request).map(drop)
    }

    /// Starts the container's process; returns its pid in the guest.
    pub async fn start_container(&self, container_id: &str) -> Result<u32, ClientError> {
        let request = container_request(container_id);
        call!(self, start_container, "StartContainer", request).map(|r| r.pid)
    }

    pub async fn remove_container(
        &self,
        container_id: &str,
        timeout_secs: u32,
    ) -> Result<(), ClientError> {
        let request = RemoveContainerRequest {
            container_id: container_id.to_owned(),
            timeout_secs,
            ..Default::default()
        };
        call!(self, remove_container, "RemoveContainer", request).map(drop)
    }

    /// Changes the container's resources; `resources_json` is an OCI
    /// `LinuxResources` object holding the fields to change.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: &str,
    ) -> Result<(), ClientError> {
        let request = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources: protobuf::MessageField::some(LinuxResourcesUpdate {
                resources_json: resources_json.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        call!(self, update_container, "UpdateContainer", request).map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        let request = container_request(container_id);
        call!(self, pause_container, "PauseContainer", request).map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        let request = container_request(container_id);
        call!(self, resume_container, "ResumeContainer", request).map(drop)
    }

    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        let request = container_request(container_id);
        call!(self, stats_container, "StatsContainer", request)
    }

    pub async fn list_processes(
        &self,
        container_id: &str,
    ) -> Result<Vec<ProcessInfo>, ClientError> {
        let request = container_request(container_id);
        call!(self, list_processes, "ListProcesses", request).map(|r| r.processes)
    }

    /// Starts an extra process in a container; returns its pid.
    pub async fn exec_process(&self, request: ExecProcessRequest) -> Result<u32, ClientError> {
        call!(self, exec_process, "ExecProcess", request).map(|r| r.pid)
    }

    /// Signals a process (the init when `exec_id` is empty), or with `all`
    /// every process of the container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        let request = SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        call!(self, signal_process, "SignalProcess", request).map(drop)
    }

    /// Waits (without deadline) until the process has exited and its output
    /// has been delivered.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitStatus, ClientError> {
        let request = process_request(container_id, exec_id);
        call!(self, wait_process, "WaitProcess", request, None).map(|r| ExitStatus {
            status: r.exit_status,
            exited_at_unix_ns: r.exited_at_unix_ns,
        })
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        let request = process_request(container_id, exec_id);
        call!(self, close_stdin, "CloseStdin", request).map(drop)
    }

    pub async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), ClientError> {
        let request = TtyWinResizeRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            columns,
            ..Default::default()
        };
        call!(self, tty_win_resize, "TtyWinResize", request).map(drop)
    }

    /// Events after `after_sequence`, waiting up to `timeout_ms` for one.
    pub async fn get_events(
        &self,
        after_sequence: u64,
        timeout_ms: u32,
    ) -> Result<Vec<Event>, ClientError> {
        let request = GetEventsRequest {
            after_sequence,
            timeout_ms,
            ..Default::default()
        };
        let deadline = self.call_timeout + Duration::from_millis(u64::from(timeout_ms));
        call!(self, get_events, "GetEvents", request, Some(deadline)).map(|r| r.events)
    }

    pub async fn guest_details(&self) -> Result<GuestDetails, ClientError> {
        call!(self, get_guest_details, "GetGuestDetails", Empty::new())
    }

    /// Whether the agent serves.
    pub async fn check(&self) -> Result<bool, ClientError> {
        self.check_within(self.call_timeout).await
    }

    /// Whether the agent serves, answered within `timeout` (a health probe).
    pub async fn check_within(&self, timeout: Duration) -> Result<bool, ClientError> {
        call!(self, check, "Check", Empty::new(), Some(timeout))
            .map(|r| r.status.value() == health_check_response::ServingStatus::SERVING as i32)
    }

    /// Up to `max_bytes` of the agent's log from `offset`; returns the data
    /// and the offset to ask for next.
    pub async fn read_log(
        &self,
        offset: u64,
        max_bytes: u32,
    ) -> Result<(Vec<u8>, u64), ClientError> {
        let request = ReadLogRequest {
            offset,
            max_bytes,
            ..Default::default()
        };
        call!(self, read_log, "ReadLog", request).map(|r| (r.data, r.next_offset))
    }

    /// The guest's memory, CPU, load and per-container figures.
    pub async fn guest_metrics(&self) -> Result<GuestMetrics, ClientError> {
        call!(self, get_guest_metrics, "GetGuestMetrics", Empty::new())
    }

    /// Tells an agent whose VM was restored from a template the host's
    /// clock, fresh entropy and the pod's NIC addresses (`Restored`).
    pub async fn restored(&self, request: RestoredRequest) -> Result<(), ClientError> {
        call!(self, restored, "Restored", request).map(|_| ())
    }

    /// Has the agent serve its debug shell; returns the vsock port.
    pub async fn start_debug_console(&self) -> Result<u32, ClientError> {
        call!(self, start_debug_console, "StartDebugConsole", Empty::new()).map(|r| r.port)
    }
}
