//! The virtio-fs model served over vhost-user, for an external VMM.
//!
//! [`VhostUserFsBackend`] adapts [`FsDeviceModel`] to vhost-user-backend's
//! [`VhostUserBackend`]: one vring worker thread per queue (hiprio and each
//! request queue), each draining its queue when the frontend kicks it.
//! [`serve_vhost_user`] binds the socket (so a bad path fails the call, not
//! the thread) and spawns one server thread that waits for the frontend
//! (QEMU's `vhost-user-fs-device`, guest memory shared through memfd), runs
//! the [`VhostUserDaemon`] session, and tears everything down when the
//! frontend disconnects or [`VhostUserServer::stop`] is called.
//!
//! vhost-user-backend gives no handle on the accepted connection, yet a
//! stop must end a session whose frontend is still connected. After the
//! daemon accepts, the server thread finds the connection among its own fds
//! (a connected socket whose local address is our socket path), keeps a
//! duplicate, and `stop` shuts that duplicate down, which ends the daemon's
//! request loop like a frontend hang-up would.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::vhost_user::accepted_connections;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::FsConfig;
use super::device::FsDeviceModel;
use super::FsError;

/// Protocol features we implement: several queues (so QEMU checks our
/// queue count against `num-request-queues`), acknowledged requests, and
/// memory slots added one at a time.
const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
/// Epoll token of the listening socket while waiting for the frontend.
const TOKEN_LISTENER: u64 = 0;
/// Epoll token of the stop event while waiting for the frontend.
const TOKEN_STOP: u64 = 1;
/// Events one `epoll_wait` can return while waiting to accept.
const ACCEPT_EPOLL_EVENTS: usize = 2;
/// The daemon's thread name (the vring workers are named by the library).
const DAEMON_THREAD_NAME: &str = "vhost-user-fs";

/// The device model as a vhost-user backend.
pub struct VhostUserFsBackend {
    model: FsDeviceModel,
    memory: RwLock<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: AtomicBool,
    exit_events: Vec<ExitEvent>,
    /// Consumer fds handed to vhost-user-backend, which registers them with
    /// epoll through `into_raw_fd` and never closes them; closed in `drop`.
    handed_out_consumers: Mutex<Vec<RawFd>>,
}

/// The stop event of one vring worker thread.
struct ExitEvent {
    consumer: EventConsumer,
    notifier: EventNotifier,
}

impl VhostUserFsBackend {
    /// Builds the backend for `config` with an empty memory map (the
    /// frontend sends the real one).
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        let model = FsDeviceModel::new(config)?;
        let exit_events = (0..model.num_queues())
            .map(|_| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .map(|(consumer, notifier)| ExitEvent { consumer, notifier })
                    .map_err(|source| FsError::EventSetup {
                        what: "vring worker exit event",
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            model,
            memory: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            exit_events,
            handed_out_consumers: Mutex::new(Vec::new()),
        })
    }

    /// The device model behind the backend.
    pub fn model(&self) -> &FsDeviceModel {
        &self.model
    }

    fn current_memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.memory.read().ok().map(|memory| memory.clone())
    }

    fn serve_vring(&self, queue_index: usize, vring: &VringRwLock) {
        let Some(atomic) = self.current_memory() else {
            tracing::error!(
                queue = queue_index,
                "vhost-user-fs: guest memory lock poisoned"
            );
            return;
        };
        let memory = atomic.memory();
        let mut state = vring.get_mut();
        match self.model.process_queue(&memory, state.get_queue_mut()) {
            Ok(true) => {
                if let Err(error) = state.signal_used_queue() {
                    tracing::error!(%error, queue = queue_index, "vhost-user-fs: cannot signal the used queue");
                }
            }
            Ok(false) => {}
            // A queue the frontend has not finished setting up, or a broken
            // ring: log it, but keep the worker alive for the next kick.
            Err(error) => {
                tracing::warn!(%error, queue = queue_index, "vhost-user-fs: cannot process queue")
            }
        }
    }
}

impl Drop for VhostUserFsBackend {
    fn drop(&mut self) {
        let handed_out = match self.handed_out_consumers.get_mut() {
            Ok(fds) => std::mem::take(fds),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        for fd in handed_out {
            // SAFETY: `fd` came from `try_clone` in `exit_event` and was
            // given away through `into_raw_fd` by vhost-user-backend, which
            // never closes it. Every holder of this backend, the vring
            // handlers included, is gone (this is the last reference), so
            // nobody else uses or closes the number.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl VhostUserBackend for VhostUserFsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.model.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.model.queue_size())
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | self.model.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings get the flag from vhost-user-backend itself; the model's
        // queue loop handles both modes, so this is only recorded.
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size as usize];
        self.model.read_config(u64::from(offset), &mut data);
        data
    }

    fn update_memory(&self, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        let mut current = self
            .memory
            .write()
            .map_err(|_| std::io::Error::other("vhost-user-fs guest memory lock poisoned"))?;
        *current = memory;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue, so a long read on one request queue never
        // holds up the others or the hiprio queue.
        (0..self.model.num_queues())
            .map(|queue| 1u64 << queue)
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exit = self.exit_events.get(thread_index)?;
        let consumer = exit.consumer.try_clone().ok()?;
        let notifier = exit.notifier.try_clone().ok()?;
        match self.handed_out_consumers.lock() {
            Ok(mut handed_out) => handed_out.push(consumer.as_raw_fd()),
            Err(poisoned) => poisoned.into_inner().push(consumer.as_raw_fd()),
        }
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            tracing::debug!(?evset, thread_id, "vhost-user-fs: unexpected event set");
            return Ok(());
        }
        // Each thread owns exactly one queue, so the queue index is the
        // thread index and the vring is the thread's only one.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.serve_vring(thread_id, vring),
            None => tracing::debug!(
                device_event,
                thread_id,
                "vhost-user-fs: event for an unknown vring"
            ),
        }
        Ok(())
    }
}

/// A running vhost-user-fs server; stopping or dropping it ends the session
/// and removes the socket.
pub struct VhostUserServer {
    socket_path: PathBuf,
    control: Arc<ServerControl>,
    thread: Option<JoinHandle<Result<(), FsError>>>,
}

/// What `stop` needs to reach the server thread in either phase.
struct ServerControl {
    stop_event: EventFd,
    state: Mutex<SessionState>,
}

#[derive(Default)]
struct SessionState {
    stop_requested: bool,
    connection: Option<OwnedFd>,
}

impl ServerControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Binds `socket_path` (replacing a stale socket) and serves `config` to
/// the first frontend that connects, from a new thread.
pub fn serve_vhost_user(socket_path: &Path, config: FsConfig) -> Result<VhostUserServer, FsError> {
    let backend = Arc::new(VhostUserFsBackend::new(&config)?);
    let daemon_memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon = VhostUserDaemon::new(DAEMON_THREAD_NAME.to_owned(), backend, daemon_memory)
        .map_err(|error| FsError::VhostUserDaemon {
            socket: socket_path.to_owned(),
            reason: error.to_string(),
        })?;
    let listener = Listener::new(socket_path, true).map_err(|error| FsError::VhostUserListen {
        socket: socket_path.to_owned(),
        reason: error.to_string(),
    })?;
    let control = Arc::new(ServerControl {
        stop_event: EventFd::new(EFD_NONBLOCK).map_err(|source| FsError::EventSetup {
            what: "server stop eventfd",
            source,
        })?,
        state: Mutex::new(SessionState::default()),
    });
    let session = Session {
        socket_path: socket_path.to_owned(),
        daemon,
        listener,
        control: control.clone(),
    };
    let name = format!("{DAEMON_THREAD_NAME}-server");
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || session.run())
        .map_err(|source| FsError::SpawnThread { name, source })?;
    tracing::info!(socket = %socket_path.display(), tag = %config.tag, "vhost-user-fs listening");
    Ok(VhostUserServer {
        socket_path: socket_path.to_owned(),
        control,
        thread: Some(thread),
    })
}

impl VhostUserServer {
    /// The socket the frontend connects to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether the session has ended (frontend gone or never coming back).
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .is_none_or(|thread| thread.is_finished())
    }

    /// Ends the session, joins every thread and removes the socket. Returns
    /// the session's own error, if it failed before the stop.
    pub fn stop(mut self) -> Result<(), FsError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FsError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut state = self.control.lock();
            state.stop_requested = true;
            if let Some(connection) = &state.connection {
                shutdown_socket(connection);
            }
        }
        if let Err(error) = self.control.stop_event.write(1) {
            tracing::error!(%error, "vhost-user-fs: cannot signal the server to stop");
        }
        // A frontend that connected and hung up at once leaves the daemon
        // blocked in accept(); one throwaway connection wakes it, and the
        // session sees stop_requested and ends.
        if !thread.is_finished() {
            let _ = UnixStream::connect(&self.socket_path);
        }
        let result = thread.join().map_err(|_| FsError::ServerPanicked {
            socket: self.socket_path.clone(),
        })?;
        remove_socket(&self.socket_path);
        result
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::warn!(%error, "vhost-user-fs server ended with an error");
        }
    }
}

/// The server thread's state: one frontend session from accept to teardown.
struct Session {
    socket_path: PathBuf,
    daemon: VhostUserDaemon<Arc<VhostUserFsBackend>>,
    listener: Listener,
    control: Arc<ServerControl>,
}

impl Session {
    fn run(mut self) -> Result<(), FsError> {
        let result = self.serve();
        // Dropping the daemon sends the vring workers their exit events and
        // joins them; dropping the listener removes the socket.
        drop(self.daemon);
        drop(self.listener);
        result
    }

    fn serve(&mut self) -> Result<(), FsError> {
        if !self.wait_for_frontend()? {
            return Ok(());
        }
        self.daemon
            .start(&mut self.listener)
            .map_err(|error| FsError::VhostUserSession {
                socket: self.socket_path.clone(),
                reason: error.to_string(),
            })?;
        self.track_connection();
        tracing::info!(socket = %self.socket_path.display(), "vhost-user-fs frontend connected");
        let result = self.daemon.wait();
        tracing::info!(socket = %self.socket_path.display(), "vhost-user-fs session ended");
        match result {
            Ok(()) => Ok(()),
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_),
            )) => Ok(()),
            Err(_) if self.control.lock().stop_requested => Ok(()),
            Err(error) => Err(FsError::VhostUserSession {
                socket: self.socket_path.clone(),
                reason: error.to_string(),
            }),
        }
    }

    /// Sleeps until a frontend connects (true) or a stop is requested (false).
    fn wait_for_frontend(&self) -> Result<bool, FsError> {
        let setup_error = |source| FsError::EventSetup {
            what: "accept epoll",
            source,
        };
        let epoll = Epoll::new().map_err(setup_error)?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(setup_error)?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.control.stop_event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(setup_error)?;
        let mut events = [EpollEvent::default(); ACCEPT_EPOLL_EVENTS];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(setup_error(source)),
            };
            if self.control.lock().stop_requested
                || events[..ready].iter().any(|e| e.data() == TOKEN_STOP)
            {
                return Ok(false);
            }
            if events[..ready].iter().any(|e| e.data() == TOKEN_LISTENER) {
                return Ok(true);
            }
        }
    }

    /// Records a duplicate of the accepted connection so `stop` can shut it
    /// down, or shuts it down at once if a stop already came in.
    fn track_connection(&self) {
        let connection = accepted_connections(&self.socket_path).into_iter().next();
        let mut state = self.control.lock();
        match connection {
            Some(connection) => {
                if state.stop_requested {
                    shutdown_socket(&connection);
                }
                state.connection = Some(connection);
            }
            None => tracing::warn!(
                socket = %self.socket_path.display(),
                "vhost-user-fs: cannot find the accepted connection; stop will wait for the frontend to hang up"
            ),
        }
    }
}

fn shutdown_socket(connection: &OwnedFd) {
    // SAFETY: shutdown(2) on an fd we own; no memory is involved.
    if unsafe { libc::shutdown(connection.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "vhost-user-fs: shutdown of the connection failed");
    }
}

fn remove_socket(socket_path: &Path) {
    match std::fs::remove_file(socket_path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(%error, socket = %socket_path.display(), "cannot remove the vhost-user-fs socket")
        }
    }
}
