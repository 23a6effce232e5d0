//! The vhost-user adapter: the same vsock model served to an external VMM
//! (QEMU's `vhost-user-vsock-device`) by `vhost-user-backend`.
//!
//! [`VhostUserVsockBackend`] implements `VhostUserBackend`: the framework's
//! vring worker thread calls [`VhostUserBackend::handle_event`] for queue
//! kicks, and for the muxer's epoll fd, which we register with that worker
//! as an extra listener, so one thread runs queues and host sockets alike.
//! Queue processing is [`QueueProcessor`], shared with the MMIO transport.
//!
//! [`serve_vhost_user`] runs a server thread that accepts one frontend at a
//! time on the vhost-user socket, with a fresh backend per frontend session
//! (the host-side listening socket persists across sessions).
//! `VhostUserDaemon` offers no way to end a session from our side, so the
//! server keeps a duplicate of the accepted frontend socket and shuts it down
//! on [`VhostUserServer::stop`], which makes the daemon's request loop end.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::QueueProcessor;
use super::muxer::{bind_listener, Muxer};
use super::{
    VsockConfig, VsockError, VsockTimeouts, EVENT_QUEUE_INDEX, NUM_QUEUES, QUEUE_SIZE,
    RX_QUEUE_INDEX, TX_QUEUE_INDEX, VIRTIO_RING_F_EVENT_IDX,
};
use crate::vhost_user::accepted_connections;
use crate::VIRTIO_F_VERSION_1;

/// Guest memory as the vhost-user framework shares it (no dirty bitmap).
type GuestMemoryShared = GuestMemoryAtomic<GuestMemoryMmap>;
/// Device event id of the muxer's epoll fd. Ids `0..NUM_QUEUES` are the
/// queues and `NUM_QUEUES` is the framework's exit event, so the first id
/// free for backends is `NUM_QUEUES + 1`.
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;

struct BackendInner {
    muxer: Muxer,
    processor: QueueProcessor,
}

/// A vsock device model as a vhost-user backend.
pub struct VhostUserVsockBackend {
    guest_cid: u64,
    memory: GuestMemoryShared,
    inner: Mutex<BackendInner>,
}

impl VhostUserVsockBackend {
    /// A backend over `muxer`, reading guest memory through `memory` (the
    /// same object the daemon updates on `SET_MEM_TABLE`).
    pub fn new(guest_cid: u64, muxer: Muxer, memory: GuestMemoryShared) -> Self {
        Self {
            guest_cid,
            memory,
            inner: Mutex::new(BackendInner {
                muxer,
                processor: QueueProcessor::default(),
            }),
        }
    }

    /// The muxer's epoll fd, to register with the vring worker.
    fn muxer_fd(&self) -> io::Result<RawFd> {
        Ok(self.lock()?.muxer.as_raw_fd())
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, BackendInner>> {
        self.inner
            .lock()
            .map_err(|_| io::Error::other("vsock backend state poisoned by a panic"))
    }

    /// Runs tx and/or rx on the vrings and notifies the frontend.
    fn pump(
        &self,
        vrings: &[VringRwLock<GuestMemoryShared>],
        mut run_tx: bool,
        mut run_rx: bool,
    ) -> io::Result<()> {
        let (Some(rx_vring), Some(tx_vring)) =
            (vrings.get(RX_QUEUE_INDEX), vrings.get(TX_QUEUE_INDEX))
        else {
            return Ok(());
        };
        let memory = self.memory.memory();
        let mut inner = self.lock()?;
        let BackendInner { muxer, processor } = &mut *inner;
        let (mut notify_rx, mut notify_tx) = (false, false);
        loop {
            if run_tx {
                let mut state = tx_vring.get_mut();
                let queue = state.get_queue_mut();
                if virtio_queue::QueueT::ready(queue) {
                    notify_tx |= processor
                        .process_tx(queue, &*memory, muxer)
                        .map_err(io::Error::other)?;
                }
                run_rx = true;
            }
            if run_rx {
                let mut state = rx_vring.get_mut();
                let queue = state.get_queue_mut();
                if virtio_queue::QueueT::ready(queue) {
                    notify_rx |= processor
                        .process_rx(queue, &*memory, muxer)
                        .map_err(io::Error::other)?;
                }
            }
            run_tx = processor.tx_stalled() && !muxer.tx_backlog_full();
            if !run_tx {
                break;
            }
        }
        drop(inner);
        // The vring locks are released above: signalling takes them again.
        if notify_tx {
            tx_vring.signal_used_queue()?;
        }
        if notify_rx {
            rx_vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryShared>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU's vhost-user-vsock reads guest_cid with GET_CONFIG.
        VhostUserProtocolFeatures::CONFIG
    }

    fn acked_features(&self, _features: u64) {
        // SET_FEATURES starts every driver session (first boot, reboot, driver
        // reload): connections of an earlier session belong to sockets that no
        // longer exist in the guest.
        match self.lock() {
            Ok(mut inner) => inner.muxer.reset_connections(),
            Err(error) => tracing::error!(%error, "cannot reset vsock connections"),
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The framework sets the flag on every vring's queue, and
        // QueueProcessor asks the queue, so nothing to keep here.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.guest_cid.to_le_bytes();
        let start = (offset as usize).min(config.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&self, _memory: GuestMemoryShared) -> io::Result<()> {
        // `memory` is a clone of the atomic we already hold.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(error) => {
                tracing::error!(%error, "cannot create the vsock vring worker's exit event");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            e if e as usize == RX_QUEUE_INDEX => self.pump(vrings, false, true),
            e if e as usize == TX_QUEUE_INDEX => self.pump(vrings, true, false),
            // Only TRANSPORT_RESET travels on the event queue; we never send it.
            e if e as usize == EVENT_QUEUE_INDEX => Ok(()),
            MUXER_EVENT => {
                self.lock()?.muxer.process_host_events();
                self.pump(vrings, false, true)
            }
            other => {
                tracing::warn!(event = other, "unexpected vhost-user vsock event");
                Ok(())
            }
        }
    }
}

/// A running vhost-user vsock server; [`Self::stop`] (or drop) ends it.
pub struct VhostUserServer {
    socket_path: PathBuf,
    uds_path: PathBuf,
    stopping: Arc<AtomicBool>,
    wake: EventFd,
    frontend: Arc<Mutex<Vec<OwnedFd>>>,
    thread: Option<JoinHandle<()>>,
}

/// Serves `config`'s vsock device to vhost-user frontends on `socket_path`,
/// from a new thread. Both `socket_path` and `config.uds_path` exist when
/// this returns.
pub fn serve_vhost_user(
    socket_path: &Path,
    config: VsockConfig,
) -> Result<VhostUserServer, VsockError> {
    serve_vhost_user_with_timeouts(socket_path, config, VsockTimeouts::default())
}

/// Like [`serve_vhost_user`] with non-default timeouts.
pub fn serve_vhost_user_with_timeouts(
    socket_path: &Path,
    config: VsockConfig,
    timeouts: VsockTimeouts,
) -> Result<VhostUserServer, VsockError> {
    config.validate()?;
    let vhost_error = |message: String| VsockError::VhostUser {
        path: socket_path.to_owned(),
        message,
    };
    let uds_listener = bind_listener(&config.uds_path)?;
    let listener = match Listener::new(socket_path, true) {
        Ok(listener) => listener,
        Err(error) => {
            let _ = std::fs::remove_file(&config.uds_path);
            return Err(vhost_error(error.to_string()));
        }
    };
    let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::Event {
        what: "server wake eventfd",
        source,
    })?;
    let session = Session {
        socket_path: socket_path.to_owned(),
        config: config.clone(),
        timeouts,
        listener,
        uds_listener,
        stopping: Arc::new(AtomicBool::new(false)),
        wake: wake.try_clone().map_err(|source| VsockError::Event {
            what: "server wake eventfd",
            source,
        })?,
        frontend: Arc::new(Mutex::new(Vec::new())),
    };
    let stopping = session.stopping.clone();
    let frontend = session.frontend.clone();
    let name = format!("vhost-user-vsock-cid{}", config.guest_cid);
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || session.run())
        .map_err(|source| VsockError::Thread { name, source })?;
    Ok(VhostUserServer {
        socket_path: socket_path.to_owned(),
        uds_path: config.uds_path,
        stopping,
        wake,
        frontend,
        thread: Some(thread),
    })
}

impl VhostUserServer {
    /// The vhost-user socket frontends connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Ends the server: disconnects a connected frontend, joins the thread
    /// and removes both sockets.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(error) = self.wake.write(1) {
            tracing::error!(%error, "cannot wake the vhost-user vsock server");
        }
        shutdown_frontend(&self.frontend);
        if thread.join().is_err() {
            tracing::error!("the vhost-user vsock server thread panicked");
        }
        let _ = std::fs::remove_file(&self.socket_path);
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn shutdown_frontend(frontend: &Mutex<Vec<OwnedFd>>) {
    if let Ok(fds) = frontend.lock() {
        for fd in fds.iter() {
            // SAFETY: plain system call on an fd we own (a dup of the
            // frontend socket); shutting it down ends the daemon's reads.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// The server thread's state.
struct Session {
    socket_path: PathBuf,
    config: VsockConfig,
    timeouts: VsockTimeouts,
    listener: Listener,
    uds_listener: UnixListener,
    stopping: Arc<AtomicBool>,
    wake: EventFd,
    frontend: Arc<Mutex<Vec<OwnedFd>>>,
}

impl Session {
    fn run(mut self) {
        while !self.stopping.load(Ordering::SeqCst) {
            match self.wait_for_frontend() {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => {
                    tracing::error!(%error, path = %self.socket_path.display(), "vhost-user vsock server failed");
                    break;
                }
            }
            if let Err(error) = self.serve_one_frontend() {
                tracing::error!(%error, "vhost-user vsock session failed");
                // Do not spin on a persistent failure: wait for the next
                // frontend or for stop.
            }
        }
    }

    /// Blocks until a frontend is connecting (true) or stop was requested.
    fn wait_for_frontend(&self) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: fds is a valid array of two pollfd.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if self.stopping.load(Ordering::SeqCst) || fds[1].revents != 0 {
                return Ok(false);
            }
            if fds[0].revents != 0 {
                return Ok(true);
            }
        }
    }

    fn serve_one_frontend(&mut self) -> Result<(), VsockError> {
        let vhost_error = |message: String| VsockError::VhostUser {
            path: self.socket_path.clone(),
            message,
        };
        let listener = self
            .uds_listener
            .try_clone()
            .map_err(|source| VsockError::Bind {
                path: self.config.uds_path.clone(),
                source,
            })?;
        let muxer = Muxer::new(&self.config, self.timeouts, listener)?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VhostUserVsockBackend::new(
            self.config.guest_cid,
            muxer,
            memory.clone(),
        ));
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-user-vsock-cid{}", self.config.guest_cid),
            backend.clone(),
            memory,
        )
        .map_err(|e| vhost_error(e.to_string()))?;
        let muxer_fd = backend.muxer_fd().map_err(|e| vhost_error(e.to_string()))?;
        for handler in daemon.get_epoll_handlers().iter().take(1) {
            handler
                .register_listener(muxer_fd, EventSet::IN, u64::from(MUXER_EVENT))
                .map_err(|e| vhost_error(format!("cannot watch the vsock muxer: {e}")))?;
        }
        daemon
            .start(&mut self.listener)
            .map_err(|e| vhost_error(e.to_string()))?;
        self.remember_frontend();
        let result = daemon.wait();
        if let Ok(mut fds) = self.frontend.lock() {
            fds.clear();
        }
        match result {
            Ok(()) => tracing::debug!("vhost-user vsock frontend disconnected"),
            Err(error) => tracing::debug!(%error, "vhost-user vsock frontend session ended"),
        }
        // Dropping the daemon stops and joins its vring worker, which drops
        // the backend and with it every host connection.
        drop(daemon);
        Ok(())
    }

    /// Keeps a duplicate of the accepted frontend socket so that stop can
    /// shut it down. The daemon does not expose it; it is the socket whose
    /// local name is our path and which is not the listener.
    fn remember_frontend(&self) {
        let found = accepted_connections(&self.socket_path);
        if let Ok(mut fds) = self.frontend.lock() {
            *fds = found;
        }
        // stop() may have looked at the list before we filled it.
        if self.stopping.load(Ordering::SeqCst) {
            shutdown_frontend(&self.frontend);
        }
    }
}
