//! The ttrpc face of the agent: each RPC unpacks its request, calls the
//! sandbox, and packs the answer. Errors become ttrpc statuses (and a log
//! line); none of them ends the agent.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_protocols::agent::*;
use husk_protocols::agent_ttrpc::Agent;
use tokio::sync::mpsc;
use ttrpc::asynchronous::TtrpcContext;

use crate::error::AgentError;
use crate::events;
use crate::sandbox::Sandbox;

/// Most log bytes one ReadLog returns.
const MAX_READ_LOG_BYTES: u32 = 1 << 20;

/// The service; `shutdown` tells the main task to end the VM (or, in test
/// mode, the agent) after DestroySandbox has answered.
pub struct AgentService {
    pub sandbox: Arc<Sandbox>,
    pub shutdown: mpsc::Sender<()>,
}

fn reply<T>(method: &'static str, result: Result<T, AgentError>) -> ttrpc::Result<T> {
    result.map_err(|error| {
        tracing::warn!(method, code = ?error.code(), "{error}");
        error.into()
    })
}

#[async_trait]
impl Agent for AgentService {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        r: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "CreateSandbox",
            self.sandbox.create_sandbox(&r).map(|_| Empty::new()),
        )
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        r: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "ConfigureNetwork",
            self.sandbox
                .configure_network(&r)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        r: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self.sandbox.destroy_sandbox(&r.sandbox_id).await;
        if result.is_ok() {
            let _ = self.shutdown.try_send(());
        }
        reply("DestroySandbox", result.map(|_| Empty::new()))
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        r: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "CreateContainer",
            self.sandbox
                .create_container(&r)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let result = self.sandbox.start_container(&r.container_id).await;
        reply(
            "StartContainer",
            result.map(|pid| StartContainerResponse {
                pid,
                ..Default::default()
            }),
        )
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        r: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let timeout = match r.timeout_secs {
            0 => Duration::from_secs(10),
            secs => Duration::from_secs(u64::from(secs)),
        };
        let result = self
            .sandbox
            .remove_container(&r.container_id, timeout)
            .await;
        reply("RemoveContainer", result.map(|_| Empty::new()))
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        r: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let resources = r.resources.resources_json.clone();
        let result = self.sandbox.update_container(&r.container_id, &resources);
        reply("UpdateContainer", result.map(|_| Empty::new()))
    }

    async fn pause_container(&self, _: &TtrpcContext, r: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(
            "PauseContainer",
            self.sandbox
                .pause_container(&r.container_id)
                .map(|_| Empty::new()),
        )
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "ResumeContainer",
            self.sandbox
                .resume_container(&r.container_id)
                .map(|_| Empty::new()),
        )
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        reply(
            "StatsContainer",
            self.sandbox.stats_container(&r.container_id),
        )
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let result = self.sandbox.list_processes(&r.container_id);
        reply(
            "ListProcesses",
            result.map(|processes| ListProcessesResponse {
                processes,
                ..Default::default()
            }),
        )
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        r: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let result = self.sandbox.exec_process(&r).await;
        reply(
            "ExecProcess",
            result.map(|pid| ExecProcessResponse {
                pid,
                ..Default::default()
            }),
        )
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        r: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self
            .sandbox
            .signal_process(&r.container_id, &r.exec_id, r.signal, r.all);
        reply("SignalProcess", result.map(|_| Empty::new()))
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        r: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let result = self.sandbox.wait_process(&r.container_id, &r.exec_id).await;
        reply(
            "WaitProcess",
            result.map(|exit| WaitProcessResponse {
                exit_status: exit.status,
                exited_at_unix_ns: exit.unix_ns(),
                ..Default::default()
            }),
        )
    }

    async fn close_stdin(&self, _: &TtrpcContext, r: ProcessRequest) -> ttrpc::Result<Empty> {
        reply(
            "CloseStdin",
            self.sandbox
                .close_stdin(&r.container_id, &r.exec_id)
                .map(|_| Empty::new()),
        )
    }

    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        r: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let result = self
            .sandbox
            .tty_win_resize(&r.container_id, &r.exec_id, r.rows, r.columns);
        reply("TtyWinResize", result.map(|_| Empty::new()))
    }

    async fn get_events(
        &self,
        _: &TtrpcContext,
        r: GetEventsRequest,
    ) -> ttrpc::Result<GetEventsResponse> {
        let wait = Duration::from_millis(u64::from(r.timeout_ms)).min(events::MAX_EVENT_WAIT);
        let events = self
            .sandbox
            .events()
            .wait_after(r.after_sequence, wait)
            .await;
        Ok(GetEventsResponse {
            events,
            ..Default::default()
        })
    }

    async fn get_guest_details(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<GuestDetails> {
        Ok(crate::guest::details())
    }

    async fn check(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<HealthCheckResponse> {
        let mut response = HealthCheckResponse::new();
        response.status = health_check_response::ServingStatus::SERVING.into();
        Ok(response)
    }

    async fn read_log(
        &self,
        _: &TtrpcContext,
        r: ReadLogRequest,
    ) -> ttrpc::Result<ReadLogResponse> {
        let max = r.max_bytes.clamp(1, MAX_READ_LOG_BYTES) as usize;
        let (data, next_offset) = crate::logging::read(r.offset, max);
        Ok(ReadLogResponse {
            data,
            next_offset,
            ..Default::default()
        })
    }

    async fn get_guest_metrics(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<GuestMetrics> {
        Ok(self.sandbox.guest_metrics())
    }

    async fn restored(&self, _: &TtrpcContext, r: RestoredRequest) -> ttrpc::Result<Empty> {
        reply(
            "Restored",
            crate::restored::apply(&r).await.map(|_| Empty::new()),
        )
    }

    async fn start_debug_console(
        &self,
        _: &TtrpcContext,
        _: Empty,
    ) -> ttrpc::Result<StartDebugConsoleResponse> {
        let result = self.sandbox.start_debug_console();
        reply(
            "StartDebugConsole",
            result.map(|_| StartDebugConsoleResponse {
                port: husk_protocols::DEBUG_CONSOLE_VSOCK_PORT,
                ..Default::default()
            }),
        )
    }
}
