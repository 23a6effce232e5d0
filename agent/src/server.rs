//! Serving the API: the ttrpc server on vsock port 1024 (or a Unix socket in
//! host test mode), the stdio stream acceptor on port 1025 (or its Unix
//! socket), the port-forward acceptor on port 1026 (guest only), the
//! reaper, and signal handling. Returns when the sandbox is
//! destroyed or the agent is told to stop; the caller then powers the VM
//! off (or, in test mode, exits).
//!
//! Signals: SIGTERM and SIGINT stop the agent after removing every
//! container; SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to every container
//! init.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use husk_protocols::{
    agent_ttrpc, AGENT_API_VSOCK_PORT, AGENT_PORT_FORWARD_VSOCK_PORT, AGENT_STDIO_VSOCK_PORT,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::events::EventLog;
use crate::port_forward::PortForwarder;
use crate::reaper::Reaper;
use crate::rpc::AgentService;
use crate::sandbox::{AgentConfig, Sandbox};
use crate::stdio::{HostStream, StreamRegistry};

/// Time for the last answer (DestroySandbox's) to leave before the end.
const FINAL_REPLY_GRACE: Duration = Duration::from_millis(200);

/// Where the agent listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// The guest: vsock ports 1024 and 1025.
    Vsock,
    /// Host test mode: two Unix sockets.
    Unix { api: PathBuf, stdio: PathBuf },
}

/// Errors that keep the agent from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the {what} handler: {source}")]
    Signal {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {address}: {message}")]
    Listen { address: String, message: String },
}

/// Serves until shutdown.
pub fn run(config: AgentConfig, listen: Listen) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("husk-agent")
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(serve(config, listen))
}

async fn serve(config: AgentConfig, listen: Listen) -> Result<(), ServeError> {
    let reaper = Reaper::start().map_err(|source| ServeError::Signal {
        what: "SIGCHLD",
        source,
    })?;
    let streams = StreamRegistry::default();
    start_stdio_acceptor(&listen, streams.clone()).await?;
    let sandbox = Arc::new(Sandbox::new(config, reaper, EventLog::default(), streams));
    if matches!(listen, Listen::Vsock) {
        start_port_forward_acceptor(PortForwarder::new(sandbox.clone()))?;
    }
    let (shutdown_sender, mut shutdown) = mpsc::channel(1);
    let service = AgentService {
        sandbox: sandbox.clone(),
        shutdown: shutdown_sender,
    };
    let address = match &listen {
        Listen::Vsock => format!("vsock://-1:{AGENT_API_VSOCK_PORT}"),
        Listen::Unix { api, .. } => {
            let _ = std::fs::remove_file(api);
            format!("unix://{}", api.display())
        }
    };
    let listen_error = |message: String| ServeError::Listen {
        address: address.clone(),
        message,
    };
    let mut server = ttrpc::asynchronous::Server::new()
        .bind(&address)
        .map_err(|e| listen_error(e.to_string()))?
        .register_service(agent_ttrpc::create_agent(Arc::new(service)));
    server
        .start()
        .await
        .map_err(|e| listen_error(e.to_string()))?;
    tracing::info!(%address, "agent API serving");
    let signal_handler = |kind: SignalKind, what: &'static str| {
        signal(kind).map_err(|source| ServeError::Signal { what, source })
    };
    let mut terminate = signal_handler(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = signal_handler(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = signal_handler(SignalKind::hangup(), "SIGHUP")?;
    let mut user1 = signal_handler(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut user2 = signal_handler(SignalKind::user_defined2(), "SIGUSR2")?;
    loop {
        use nix::sys::signal::Signal;
        tokio::select! {
            _ = shutdown.recv() => {
                tracing::info!("sandbox destroyed; shutting down");
                tokio::time::sleep(FINAL_REPLY_GRACE).await;
                break;
            }
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: removing containers and shutting down");
                sandbox.remove_all_containers().await;
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: removing containers and shutting down");
                sandbox.remove_all_containers().await;
                break;
            }
            _ = hangup.recv() => sandbox.signal_all_inits(Signal::SIGHUP),
            _ = user1.recv() => sandbox.signal_all_inits(Signal::SIGUSR1),
            _ = user2.recv() => sandbox.signal_all_inits(Signal::SIGUSR2),
        }
    }
    // In-flight calls (a WaitProcess) must not hold the end up.
    let _ = tokio::time::timeout(FINAL_REPLY_GRACE, server.shutdown()).await;
    if let Listen::Unix { api, stdio } = &listen {
        let _ = std::fs::remove_file(api);
        let _ = std::fs::remove_file(stdio);
    }
    Ok(())
}

async fn start_stdio_acceptor(listen: &Listen, streams: StreamRegistry) -> Result<(), ServeError> {
    match listen {
        Listen::Vsock => {
            let address = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, AGENT_STDIO_VSOCK_PORT);
            let listener =
                tokio_vsock::VsockListener::bind(address).map_err(|e| ServeError::Listen {
                    address: format!("vsock port {AGENT_STDIO_VSOCK_PORT}"),
                    message: e.to_string(),
                })?;
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => announce(&streams, Box::new(stream)),
                        Err(error) => tracing::warn!(%error, "stdio accept failed"),
                    }
                }
            });
        }
        Listen::Unix { stdio, .. } => {
            let _ = std::fs::remove_file(stdio);
            let listener =
                tokio::net::UnixListener::bind(stdio).map_err(|e| ServeError::Listen {
                    address: stdio.display().to_string(),
                    message: e.to_string(),
                })?;
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => announce(&streams, Box::new(stream)),
                        Err(error) => tracing::warn!(%error, "stdio accept failed"),
                    }
                }
            });
        }
    }
    Ok(())
}

/// Accepts port-forward streams on their vsock port (the guest only: in
/// host test mode there is no pod network namespace to forward into).
fn start_port_forward_acceptor(forwarder: PortForwarder) -> Result<(), ServeError> {
    let address = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, AGENT_PORT_FORWARD_VSOCK_PORT);
    let listener = tokio_vsock::VsockListener::bind(address).map_err(|e| ServeError::Listen {
        address: format!("vsock port {AGENT_PORT_FORWARD_VSOCK_PORT}"),
        message: e.to_string(),
    })?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => forwarder.spawn(Box::new(stream)),
                Err(error) => tracing::warn!(%error, "port-forward accept failed"),
            }
        }
    });
    Ok(())
}

fn announce(streams: &StreamRegistry, stream: HostStream) {
    let streams = streams.clone();
    tokio::spawn(async move { streams.announce(stream).await });
}
