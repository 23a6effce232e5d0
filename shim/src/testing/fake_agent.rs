//! A fake guest agent: the agent API over ttrpc, with an in-memory table
//! of containers and processes instead of a guest. Signals end processes
//! (exit status 128 + signal); failures can be switched on per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use husk_protocols::agent::{self, health_check_response::ServingStatus};
use husk_protocols::agent_ttrpc;
use tokio::sync::watch;
use ttrpc::r#async::TtrpcContext;

/// The guest pid the fake gives every init.
pub const INIT_PID: u32 = 100;

/// What the fake agent was asked, and what it should refuse.
#[derive(Default)]
pub struct FakeAgent {
    pub fail_create_container: AtomicBool,
    /// When set, Check, SignalProcess, RemoveContainer and DestroySandbox
    /// never answer (an agent stopped with SIGSTOP).
    pub hung: AtomicBool,
    state: Mutex<State>,
    /// Wakes a pending GetEvents when an event is queued.
    event_queued: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Process exits by (container, exec).
    processes: HashMap<(String, String), watch::Sender<Option<i32>>>,
    containers: Vec<String>,
    removed: Vec<String>,
    events: Vec<agent::Event>,
    sandboxes_destroyed: usize,
}

fn status(code: ttrpc::Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

impl FakeAgent {
    /// Never returns while [`Self::hung`] is set.
    async fn stall_if_hung(&self) {
        if self.hung.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Containers created and not removed.
    pub fn containers(&self) -> Vec<String> {
        self.state().containers.clone()
    }

    /// Containers removed, in order.
    pub fn removed(&self) -> Vec<String> {
        self.state().removed.clone()
    }

    /// Ends a process as if it exited with `code`.
    pub fn exit(&self, container: &str, exec: &str, code: i32) {
        if let Some(process) = self
            .state()
            .processes
            .get(&(container.to_owned(), exec.to_owned()))
        {
            process.send_replace(Some(code));
        }
    }

    /// Queues an OOM event naming `container` (any id: the guest lies).
    pub fn push_oom(&self, container: &str) {
        {
            let mut state = self.state();
            let mut event = agent::Event::new();
            event.sequence = state.events.len() as u64 + 1;
            event.set_oom(agent::OomKilled {
                container_id: container.to_owned(),
                ..Default::default()
            });
            state.events.push(event);
        }
        self.event_queued.notify_waiters();
    }

    fn events_after(&self, after: u64) -> Vec<agent::Event> {
        self.state()
            .events
            .iter()
            .filter(|event| event.sequence > after)
            .cloned()
            .collect()
    }

    fn add_process(&self, container: &str, exec: &str) {
        let (sender, _) = watch::channel(None);
        self.state()
            .processes
            .insert((container.to_owned(), exec.to_owned()), sender);
    }

    fn exit_receiver(
        &self,
        container: &str,
        exec: &str,
    ) -> ttrpc::Result<watch::Receiver<Option<i32>>> {
        self.state()
            .processes
            .get(&(container.to_owned(), exec.to_owned()))
            .map(watch::Sender::subscribe)
            .ok_or_else(|| {
                status(
                    ttrpc::Code::NOT_FOUND,
                    format!("process {exec:?} of {container} does not exist"),
                )
            })
    }
}

#[async_trait]
impl agent_ttrpc::Agent for FakeAgent {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        _: agent::CreateSandboxRequest,
    ) -> ttrpc::Result<agent::Empty> {
        Ok(agent::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        _: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.stall_if_hung().await;
        self.state().sandboxes_destroyed += 1;
        Ok(agent::Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        request: agent::CreateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        if self.fail_create_container.load(Ordering::SeqCst) {
            return Err(status(
                ttrpc::Code::INTERNAL,
                "the fake agent refuses CreateContainer".into(),
            ));
        }
        self.add_process(&request.container_id, "");
        self.state().containers.push(request.container_id);
        Ok(agent::Empty::new())
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        _: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::StartContainerResponse> {
        Ok(agent::StartContainerResponse {
            pid: INIT_PID,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        request: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.stall_if_hung().await;
        let mut state = self.state();
        state.containers.retain(|id| *id != request.container_id);
        state.removed.push(request.container_id);
        Ok(agent::Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        request: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::ExecProcessResponse> {
        self.add_process(&request.container_id, &request.exec_id);
        Ok(agent::ExecProcessResponse {
            pid: INIT_PID + 1,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        request: agent::SignalProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        self.stall_if_hung().await;
        let receiver = self.exit_receiver(&request.container_id, &request.exec_id)?;
        if receiver.borrow().is_some() {
            return Err(status(
                ttrpc::Code::NOT_FOUND,
                "the process already exited".into(),
            ));
        }
        self.exit(
            &request.container_id,
            &request.exec_id,
            128 + request.signal as i32,
        );
        Ok(agent::Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        request: agent::ProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        let mut receiver = self.exit_receiver(&request.container_id, &request.exec_id)?;
        let code = loop {
            if let Some(code) = *receiver.borrow_and_update() {
                break code;
            }
            if receiver.changed().await.is_err() {
                return Err(status(ttrpc::Code::UNAVAILABLE, "agent gone".into()));
            }
        };
        Ok(agent::WaitProcessResponse {
            exit_status: code,
            exited_at_unix_ns: 1,
            ..Default::default()
        })
    }

    async fn get_events(
        &self,
        _: &TtrpcContext,
        request: agent::GetEventsRequest,
    ) -> ttrpc::Result<agent::GetEventsResponse> {
        let queued = self.event_queued.notified();
        let mut events = self.events_after(request.after_sequence);
        if events.is_empty() {
            // A long poll, as the guest's: until an event or the timeout.
            let timeout = Duration::from_millis(u64::from(request.timeout_ms));
            let _ = tokio::time::timeout(timeout, queued).await;
            events = self.events_after(request.after_sequence);
        }
        Ok(agent::GetEventsResponse {
            events,
            ..Default::default()
        })
    }

    async fn check(
        &self,
        _: &TtrpcContext,
        _: agent::Empty,
    ) -> ttrpc::Result<agent::HealthCheckResponse> {
        self.stall_if_hung().await;
        Ok(agent::HealthCheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }
}

/// Serves `agent` on the Unix socket `path` until dropped.
pub struct FakeAgentServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgentServer {
    pub fn start(agent: Arc<FakeAgent>, path: &std::path::Path) -> std::io::Result<Self> {
        let address = format!("unix://{}", path.display());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the fake agent");
            runtime.block_on(async move {
                let service = agent_ttrpc::create_agent(agent);
                let server = ttrpc::asynchronous::Server::new()
                    .bind(&address)
                    .map(|server| server.register_service(service));
                let mut server = match server {
                    Ok(server) => server,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.to_string()));
                        return;
                    }
                };
                if let Err(error) = server.start().await {
                    let _ = ready_tx.send(Err(error.to_string()));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                let _ = stopped.await;
                let _ = tokio::time::timeout(Duration::from_millis(200), server.shutdown()).await;
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(message)) => Err(std::io::Error::other(message)),
            Err(_) => Err(std::io::Error::other("the fake agent thread ended")),
        }
    }
}

impl Drop for FakeAgentServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
