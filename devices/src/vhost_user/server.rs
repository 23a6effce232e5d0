//! One vhost-user server for every device model: it serves frontends on a
//! Unix socket from its own thread, one session at a time, and stops on
//! request, even while a frontend is connected.
//!
//! A device says what a session is through [`Sessions`]: the
//! `VhostUserDaemon` for the frontend that is connecting, and whether the
//! server waits for another frontend once a session has ended. The server
//! thread polls the listening socket and a stop eventfd, hands the socket to
//! the daemon when a frontend connects, and waits for the session to end.
//!
//! Stopping lives here and only here. `vhost-user-backend` owns the accepted
//! socket and offers no way to end a session from the backend's side, so
//! right after the daemon accepted, the server thread finds the connection
//! among the process's fds ([`accepted_connections`]) and keeps a duplicate;
//! [`Server::stop`] shuts that duplicate down, which ends the daemon's request
//! loop as a frontend hang-up would. A frontend that connected and hung up at
//! once can leave the daemon blocked in `accept`; stop then makes one
//! throwaway connection to wake it, and the session ends at once because a
//! stop was requested.
//!
//! A device whose frontend sends `SET_VRING_ENABLE` too early (see
//! [`Sessions::holds_early_vring_enable`]) is served through a [`Relay`]:
//! the server thread accepts the frontend itself, connects to the daemon's
//! own listener (a second socket, `<socket>.backend`, beside the first) and
//! relays the session. The server holds duplicates of both relayed
//! connections as it does of an accepted one, so a stop shuts them down
//! even while the relay is blocked writing to a frontend that stopped
//! reading; the relay then ends and closes the daemon's connection.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use husk_confine::ThreadClass;

use super::relay::Relay;
use super::{accepted_connections, FdDirectory};

/// What a device serves to each frontend.
pub trait Sessions: Send + 'static {
    /// The device's `VhostUserBackend` (what `VhostUserDaemon` can run).
    type Backend: VhostUserBackend<Bitmap = (), Vring: Clone + Send + Sync> + Clone + Send + 'static;

    /// The daemon for the frontend that is connecting now. An error ends
    /// this session before it starts.
    fn daemon(&mut self) -> Result<VhostUserDaemon<Self::Backend>, String>;

    /// Whether the server waits for another frontend after a session ended
    /// (false: the server ends with its first session).
    fn serves_again(&self) -> bool;

    /// Whether the frontend sends `SET_VRING_ENABLE` before it acks
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (QEMU's virtio-net does), so the
    /// server must answer those requests in front of the daemon, whose
    /// request loop would end the session on them.
    fn holds_early_vring_enable(&self) -> bool {
        false
    }
}

/// Why a vhost-user server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be bound.
    #[error("cannot listen on vhost-user socket {socket}: {reason}")]
    Listen { socket: PathBuf, reason: String },
    /// The stop eventfd could not be made, or waiting on it failed.
    #[error("vhost-user server on {socket}: cannot {what}: {source}")]
    Event {
        socket: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The server thread could not be spawned.
    #[error("cannot spawn the vhost-user server thread {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The daemon for a frontend could not be made.
    #[error("cannot set up the vhost-user daemon for a frontend on {socket}: {reason}")]
    Daemon { socket: PathBuf, reason: String },
    /// A session ended with an error other than the frontend hanging up.
    #[error("vhost-user session on {socket} failed: {reason}")]
    Session { socket: PathBuf, reason: String },
    /// The server thread panicked.
    #[error("the vhost-user server thread for {socket} panicked")]
    Panicked { socket: PathBuf },
    /// The server thread could not confine itself, so it served nothing.
    #[error("vhost-user server on {socket}: {source}")]
    Confine {
        socket: PathBuf,
        #[source]
        source: husk_confine::ConfineError,
    },
}

/// What the server thread returns: its state, to be dropped by the joiner,
/// and how it ended.
type ServerThreadEnd = (Box<dyn Send>, Result<(), ServerError>);

/// A running server; [`Self::stop`] (or drop) ends it.
pub struct Server {
    socket_path: PathBuf,
    /// The daemon's own socket when sessions are relayed.
    backend_socket_path: Option<PathBuf>,
    control: Arc<Control>,
    /// The server thread hands its state back instead of dropping it: the
    /// listener unlinks the socket on drop, a path operation a confined
    /// device thread may not make, so it happens on the thread that joins.
    thread: Option<JoinHandle<ServerThreadEnd>>,
}

/// What `stop` needs to reach the server thread, whatever it is doing.
struct Control {
    stop_event: EventFd,
    state: Mutex<ControlState>,
}

#[derive(Default)]
struct ControlState {
    stop_requested: bool,
    /// Duplicates of the current session's frontend connection.
    connections: Vec<OwnedFd>,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // The state is a flag and a list of fds: a panicking holder cannot
        // leave it inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stop_requested(&self) -> bool {
        self.lock().stop_requested
    }
}

/// How a server thread confines itself (see `husk-confine`) before it
/// accepts a frontend.
#[derive(Debug, Clone)]
pub enum Confinement {
    /// As this class, in the shim's mount namespace.
    Class(ThreadClass),
    /// As a virtio-fs thread serving this share (a private root holding
    /// only the share when the policy asks for one).
    FsShare(PathBuf),
}

impl Confinement {
    fn apply(&self) -> Result<(), husk_confine::ConfineError> {
        match self {
            Self::Class(class) => husk_confine::confine_current_thread(*class),
            Self::FsShare(share) => husk_confine::confine_fs_thread(share),
        }
    }
}

/// Binds `socket_path` (replacing a stale socket) and serves `sessions` on
/// it from a new thread named `name`, which confines itself as
/// `confinement` says before it accepts a frontend; the daemon's vring
/// workers, made on that thread, inherit its confinement.
pub fn serve<S: Sessions>(
    socket_path: &Path,
    name: &str,
    confinement: Confinement,
    sessions: S,
) -> Result<Server, ServerError> {
    let listener = Listener::new(socket_path, true).map_err(|error| ServerError::Listen {
        socket: socket_path.to_owned(),
        reason: error.to_string(),
    })?;
    // 0600 whatever the umask: a frontend of another user is granted the
    // socket explicitly (the QEMU backend's net socket), never by default.
    crate::owner_only(socket_path).map_err(|error| ServerError::Listen {
        socket: socket_path.to_owned(),
        reason: error.to_string(),
    })?;
    let relay_backend = if sessions.holds_early_vring_enable() {
        let path = backend_socket_path(socket_path);
        let listener = Listener::new(&path, true).map_err(|error| ServerError::Listen {
            socket: path.clone(),
            reason: error.to_string(),
        })?;
        crate::owner_only(&path).map_err(|error| ServerError::Listen {
            socket: path.clone(),
            reason: error.to_string(),
        })?;
        Some(RelayBackend { path, listener })
    } else {
        None
    };
    let backend_socket_path = relay_backend.as_ref().map(|backend| backend.path.clone());
    let stop_event = EventFd::new(EFD_NONBLOCK).map_err(|source| ServerError::Event {
        socket: socket_path.to_owned(),
        what: "create the stop eventfd",
        source,
    })?;
    let control = Arc::new(Control {
        stop_event,
        state: Mutex::new(ControlState::default()),
    });
    let fd_directory = FdDirectory::open().map_err(|source| ServerError::Event {
        socket: socket_path.to_owned(),
        what: "open /proc/self/fd",
        source,
    })?;
    let thread_state = ServerThread {
        socket_path: socket_path.to_owned(),
        confinement,
        fd_directory,
        listener,
        relay_backend,
        sessions,
        control: control.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut thread_state = thread_state;
            let result = thread_state.run();
            (Box::new(thread_state) as Box<dyn Send>, result)
        })
        .map_err(|source| ServerError::Spawn {
            name: name.to_owned(),
            source,
        })?;
    Ok(Server {
        socket_path: socket_path.to_owned(),
        backend_socket_path,
        control,
        thread: Some(thread),
    })
}

impl Server {
    /// The socket frontends connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether the server thread has ended: its sessions are over, or it
    /// failed.
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .is_none_or(|thread| thread.is_finished())
    }

    /// Ends the server: disconnects a connected frontend, joins the thread
    /// and removes the socket. Returns the server's own error, if it failed
    /// before the stop. Calling it again does nothing.
    pub fn stop(&mut self) -> Result<(), ServerError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut state = self.control.lock();
            state.stop_requested = true;
            for connection in &state.connections {
                shutdown_socket(connection);
            }
        }
        if let Err(error) = self.control.stop_event.write(1) {
            tracing::error!(%error, socket = %self.socket_path.display(), "cannot signal the vhost-user server to stop");
        }
        if !thread.is_finished() {
            // Wakes a daemon blocked in accept(); the session it starts ends
            // at once because the stop was requested.
            let _ = UnixStream::connect(&self.socket_path);
        }
        let result = thread
            .join()
            .map(|(state, result)| {
                drop(state);
                result
            })
            .map_err(|_| ServerError::Panicked {
                socket: self.socket_path.clone(),
            });
        remove_socket(&self.socket_path);
        if let Some(path) = &self.backend_socket_path {
            remove_socket(path);
        }
        result?
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(%error, "vhost-user server ended with an error");
        }
    }
}

/// The server thread's state.
struct ServerThread<S> {
    socket_path: PathBuf,
    confinement: Confinement,
    fd_directory: FdDirectory,
    listener: Listener,
    /// Set when sessions are relayed: the daemon's own listener.
    relay_backend: Option<RelayBackend>,
    sessions: S,
    control: Arc<Control>,
}

/// The daemon's side of a relayed server: its listener and that socket's
/// path.
struct RelayBackend {
    path: PathBuf,
    listener: Listener,
}

/// `<socket>.backend`: the daemon's socket beside the frontends' one.
fn backend_socket_path(socket_path: &Path) -> PathBuf {
    let mut path = socket_path.as_os_str().to_owned();
    path.push(".backend");
    PathBuf::from(path)
}

impl<S: Sessions> ServerThread<S> {
    /// Serves sessions until a stop, or until the device serves no more
    /// (the joiner then drops `self`, whose `Listener` removes the socket).
    fn run(&mut self) -> Result<(), ServerError> {
        self.confinement
            .apply()
            .map_err(|source| ServerError::Confine {
                socket: self.socket_path.clone(),
                source,
            })?;
        loop {
            if !self.wait_for_frontend()? {
                return Ok(());
            }
            let result = self.serve_one_frontend();
            if !self.sessions.serves_again() {
                return result;
            }
            if let Err(error) = result {
                // Wait for the next frontend (or the stop) rather than give
                // up: a frontend can always reconnect.
                tracing::error!(%error, "vhost-user session failed");
            }
        }
    }

    /// Sleeps until a frontend connects (true) or a stop is requested (false).
    fn wait_for_frontend(&self) -> Result<bool, ServerError> {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.control.stop_event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.control.stop_requested() {
                return Ok(false);
            }
            // SAFETY: `fds` is a valid array of two pollfd that outlives the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ret < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Event {
                    socket: self.socket_path.clone(),
                    what: "wait for a frontend",
                    source,
                });
            }
            if fds[1].revents != 0 || self.control.stop_requested() {
                return Ok(false);
            }
            if fds[0].revents != 0 {
                return Ok(true);
            }
        }
    }

    /// One session: from accepting the frontend to its daemon's end. The
    /// frontend hanging up, or being disconnected by a stop, is a normal end.
    fn serve_one_frontend(&mut self) -> Result<(), ServerError> {
        let socket_path = self.socket_path.clone();
        let session_error = |reason: String| ServerError::Session {
            socket: socket_path.clone(),
            reason,
        };
        let mut daemon = self
            .sessions
            .daemon()
            .map_err(|reason| ServerError::Daemon {
                socket: self.socket_path.clone(),
                reason,
            })?;
        let result = if self.relay_backend.is_some() {
            self.relay_session(&mut daemon)?
        } else {
            daemon
                .start(&mut self.listener)
                .map_err(|error| session_error(error.to_string()))?;
            self.track_connections();
            tracing::debug!(socket = %self.socket_path.display(), "vhost-user frontend connected");
            daemon.wait()
        };
        self.control.lock().connections.clear();
        tracing::debug!(socket = %self.socket_path.display(), "vhost-user session ended");
        // Dropping the daemon stops and joins its vring workers, which drops
        // the session's backend.
        drop(daemon);
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_),
            )) => Ok(()),
            Err(_) if self.control.stop_requested() => Ok(()),
            Err(error) => Err(session_error(error.to_string())),
        }
    }

    /// A relayed session: accepts the frontend here, connects it through a
    /// [`Relay`] to the daemon's own listener, and relays until either side
    /// hangs up or a stop comes in; then closes both connections and waits
    /// for the daemon. Returns the daemon's result. `stop` shuts both
    /// relayed connections down too, so a frontend that stops reading
    /// cannot keep the relay blocked in a write.
    fn relay_session(
        &mut self,
        daemon: &mut VhostUserDaemon<S::Backend>,
    ) -> Result<Result<(), vhost_user_backend::Error>, ServerError> {
        let session_error = |reason: String| ServerError::Session {
            socket: self.socket_path.clone(),
            reason,
        };
        let Some(frontend) = self
            .listener
            .accept()
            .map_err(|error| session_error(format!("cannot accept the frontend: {error}")))?
        else {
            // The frontend hung up before it was accepted.
            return Ok(Ok(()));
        };
        let backend = self.relay_backend.as_mut().expect("a relayed server");
        let daemon_side = UnixStream::connect(&backend.path).map_err(|error| {
            session_error(format!(
                "cannot connect to the daemon's socket {}: {error}",
                backend.path.display()
            ))
        })?;
        daemon
            .start(&mut backend.listener)
            .map_err(|error| session_error(error.to_string()))?;
        let duplicates = [&frontend, &daemon_side]
            .map(|stream| stream.try_clone().map(OwnedFd::from))
            .into_iter()
            .collect::<io::Result<Vec<_>>>()
            .map_err(|error| {
                session_error(format!("cannot duplicate the relayed connections: {error}"))
            })?;
        self.hold_connections(duplicates);
        tracing::debug!(socket = %self.socket_path.display(), "vhost-user frontend connected (relayed)");
        let mut relay = Relay::new(frontend, daemon_side);
        // SAFETY: the eventfd lives in `self.control`, which outlives the relay.
        let stop = unsafe { BorrowedFd::borrow_raw(self.control.stop_event.as_raw_fd()) };
        let end = relay.run(stop);
        if relay.held_back() > 0 {
            tracing::debug!(
                socket = %self.socket_path.display(),
                held_back = relay.held_back(),
                "answered early SET_VRING_ENABLE requests"
            );
        }
        // Closing both connections (the duplicates held for `stop` too)
        // ends the daemon's request loop.
        self.control.lock().connections.clear();
        drop(relay);
        let result = daemon.wait();
        match end {
            // A hang-up of either side or a stop: the daemon's own result
            // says how the session went.
            Ok(_) => Ok(result),
            Err(_) if self.control.stop_requested() => Ok(result),
            Err(reason) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "the relayed daemon ended");
                }
                Err(session_error(reason))
            }
        }
    }

    /// Records duplicates of the accepted connection so `stop` can shut it
    /// down, or shuts it down at once if a stop already came in (stop may
    /// have looked at the list before it was filled).
    fn track_connections(&self) {
        let found = accepted_connections(&self.fd_directory, &self.socket_path);
        if found.is_empty() {
            tracing::warn!(
                socket = %self.socket_path.display(),
                "cannot find the accepted vhost-user connection; stop will wait for the frontend to hang up"
            );
        }
        self.hold_connections(found);
    }

    /// Keeps `connections` for `stop` to shut down, or shuts them down at
    /// once if a stop already came in.
    fn hold_connections(&self, connections: Vec<OwnedFd>) {
        let mut state = self.control.lock();
        if state.stop_requested {
            for connection in &connections {
                shutdown_socket(connection);
            }
        }
        state.connections = connections;
    }
}

fn shutdown_socket(connection: &OwnedFd) {
    // SAFETY: shutdown(2) on an fd we own (a duplicate of the frontend
    // socket); no memory is involved.
    if unsafe { libc::shutdown(connection.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "shutdown of a vhost-user connection failed");
    }
}

fn remove_socket(socket_path: &Path) {
    match std::fs::remove_file(socket_path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(%error, socket = %socket_path.display(), "cannot remove the vhost-user socket")
        }
    }
}
