//! The vhost-user adapter: the same vsock model served to an external VMM
//! (QEMU's `vhost-user-vsock-device`) by `vhost-user-backend`.
//!
//! [`VhostUserVsockBackend`] implements `VhostUserBackend`: the framework's
//! vring worker thread calls [`VhostUserBackend::handle_event`] for queue
//! kicks, and for the muxer's epoll fd, which we register with that worker
//! as an extra listener, so one thread runs queues and host sockets alike.
//! The queues are run by the [`VsockModel`], as over the MMIO transport.
//!
//! [`serve_vhost_user`] serves frontends one after another on the
//! vhost-user socket through the shared server ([`crate::vhost_user`]), with
//! a fresh backend per frontend session; the host-side listening socket
//! persists across sessions, so host clients keep their place in its backlog
//! while QEMU reconnects. [`VhostUserServer::stop`] ends the server, even
//! with a frontend connected.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::model::{self, VsockModel, CONFIG_SPACE_LEN, DEVICE_FEATURES};
use super::muxer::bind_listener;
use super::{
    VsockConfig, VsockError, VsockTimeouts, EVENT_QUEUE_INDEX, NUM_QUEUES, QUEUE_SIZE,
    RX_QUEUE_INDEX, TX_QUEUE_INDEX,
};
use crate::guest_log::GuestLog;
use crate::vhost_user::{self, Sessions};
use crate::VIRTIO_F_VERSION_1;

/// Guest memory as the vhost-user framework shares it (no dirty bitmap).
type GuestMemoryShared = GuestMemoryAtomic<GuestMemoryMmap>;
/// Device event id of the muxer's epoll fd. Ids `0..NUM_QUEUES` are the
/// queues and `NUM_QUEUES` is the framework's exit event, so the first id
/// free for backends is `NUM_QUEUES + 1`.
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// A vsock device model as a vhost-user backend.
pub struct VhostUserVsockBackend {
    guest_cid: u64,
    memory: GuestMemoryShared,
    model: Mutex<VsockModel>,
}

impl VhostUserVsockBackend {
    /// A backend running `model`, reading guest memory through `memory`
    /// (the same object the daemon updates on `SET_MEM_TABLE`).
    pub fn new(guest_cid: u64, model: VsockModel, memory: GuestMemoryShared) -> Self {
        Self {
            guest_cid,
            memory,
            model: Mutex::new(model),
        }
    }

    /// The model's host-side epoll fd, to register with the vring worker.
    fn muxer_fd(&self) -> io::Result<RawFd> {
        Ok(self.lock()?.as_raw_fd())
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, VsockModel>> {
        self.model
            .lock()
            .map_err(|_| io::Error::other("vsock backend state poisoned by a panic"))
    }

    /// Runs the model on the vrings and notifies the frontend.
    fn pump(
        &self,
        vrings: &[VringRwLock<GuestMemoryShared>],
        run_tx: bool,
        run_rx: bool,
    ) -> io::Result<()> {
        let (Some(rx_vring), Some(tx_vring)) =
            (vrings.get(RX_QUEUE_INDEX), vrings.get(TX_QUEUE_INDEX))
        else {
            return Ok(());
        };
        let memory = self.memory.memory();
        let used = {
            let mut model = self.lock()?;
            let mut rx_state = rx_vring.get_mut();
            let mut tx_state = tx_vring.get_mut();
            model
                .pump(
                    &*memory,
                    rx_state.get_queue_mut(),
                    tx_state.get_queue_mut(),
                    run_tx,
                    run_rx,
                )
                .map_err(io::Error::other)?
        };
        // The vring locks are released above: signalling takes them again.
        if used.tx {
            tx_vring.signal_used_queue()?;
        }
        if used.rx {
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
        VIRTIO_F_VERSION_1 | DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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
            Ok(mut model) => model.reset_connections(),
            Err(error) => tracing::error!(%error, "cannot reset vsock connections"),
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The framework sets the flag on every vring's queue, and
        // QueueProcessor asks the queue, so nothing to keep here.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Only the bytes that exist: a read past the end comes back short.
        let start = (offset as usize).min(CONFIG_SPACE_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SPACE_LEN);
        let mut data = vec![0; end - start];
        model::read_config(self.guest_cid, u64::from(offset), &mut data);
        data
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
                self.lock()?.process_host_events();
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
    server: vhost_user::Server,
    uds_path: PathBuf,
}

/// Serves `config`'s vsock device to vhost-user frontends on `socket_path`,
/// one after another, from a new thread. Both `socket_path` and
/// `config.uds_path` exist when this returns.
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
    let uds_listener = bind_listener(&config.uds_path)?;
    let uds_path = config.uds_path.clone();
    let name = format!("vhost-user-vsock-cid{}", config.guest_cid);
    let sessions = VsockSessions {
        socket_path: socket_path.to_owned(),
        config,
        timeouts,
        uds_listener,
        guest_log: GuestLog::new(),
    };
    match vhost_user::serve(
        socket_path,
        &name,
        vhost_user::Confinement::Class(husk_confine::ThreadClass::Device),
        sessions,
    ) {
        Ok(server) => Ok(VhostUserServer { server, uds_path }),
        Err(error) => {
            let _ = std::fs::remove_file(&uds_path);
            Err(VsockError::VhostUser {
                path: socket_path.to_owned(),
                message: error.to_string(),
            })
        }
    }
}

impl VhostUserServer {
    /// The vhost-user socket frontends connect to.
    pub fn socket_path(&self) -> &Path {
        self.server.socket_path()
    }

    /// Whether the server has ended on its own (it serves frontends until
    /// stopped, so this means it failed).
    pub fn is_finished(&self) -> bool {
        self.server.is_finished()
    }

    /// Ends the server: disconnects a connected frontend, joins the thread
    /// and removes both sockets.
    pub fn stop(mut self) {
        self.stop_and_remove_sockets();
    }

    fn stop_and_remove_sockets(&mut self) {
        if let Err(error) = self.server.stop() {
            tracing::error!(%error, "the vhost-user vsock server failed");
        }
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        self.stop_and_remove_sockets();
    }
}

/// A fresh backend for every frontend, over the one host listening socket.
struct VsockSessions {
    socket_path: PathBuf,
    config: VsockConfig,
    timeouts: VsockTimeouts,
    uds_listener: UnixListener,
    /// One budget for every session's guest-triggered lines.
    guest_log: GuestLog,
}

impl VsockSessions {
    fn new_daemon(&mut self) -> Result<VhostUserDaemon<Arc<VhostUserVsockBackend>>, VsockError> {
        let vhost_error = |message: String| VsockError::VhostUser {
            path: self.socket_path.clone(),
            message,
        };
        let model = VsockModel::new(
            &self.config,
            self.timeouts,
            &self.uds_listener,
            self.guest_log.clone(),
        )?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VhostUserVsockBackend::new(
            self.config.guest_cid,
            model,
            memory.clone(),
        ));
        let daemon = VhostUserDaemon::new(
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
        Ok(daemon)
    }
}

impl Sessions for VsockSessions {
    type Backend = Arc<VhostUserVsockBackend>;

    fn daemon(&mut self) -> Result<VhostUserDaemon<Self::Backend>, String> {
        self.new_daemon().map_err(|error| error.to_string())
    }

    fn serves_again(&self) -> bool {
        // A guest reboot under QEMU, or a QEMU restart, reconnects.
        true
    }
}
