//! The vhost-user adapter: the same net model served to an external VMM
//! (QEMU's `-netdev vhost-user` under `-device virtio-net-device`) by
//! `vhost-user-backend`.
//!
//! [`VhostUserNetBackend`] implements `VhostUserBackend` with one vring
//! worker thread for both queues. Besides the two kick eventfds that
//! thread's epoll watches the TAP fd (edge-triggered, registered as an
//! extra listener) and a resume eventfd the backend writes when the model
//! stopped at its budget with work left, so a busy direction yields to the
//! other and to the framework's exit event without losing its place.
//!
//! QEMU's virtio-net owns the card's identity over vhost-user: it answers
//! the guest's config-space reads itself (MAC from `mac=`, MTU from
//! `host_mtu=`, link status), so the backend offers no CONFIG protocol
//! feature. It forwards to the backend only the feature bits its
//! vhost-user net client lists (`user_feature_bits` in QEMU 7.2's
//! `net/vhost-user.c`: the ring features, VERSION_1, the offloads,
//! MRG_RXBUF, MTU, MQ...), intersected with what the backend offers; MAC
//! and STATUS never reach us. Every SET_FEATURES starts a driver session
//! ([`VhostUserBackend::acked_features`]): the model sets the TAP's
//! offloads to the guest-side offloads acked. No MQ (one queue pair), so
//! QEMU never asks for the queue count.
//!
//! [`serve_vhost_user`] serves frontends one after another on the
//! vhost-user socket through the shared server ([`crate::vhost_user`]),
//! with a fresh backend per frontend session over the same TAP, counters
//! and log budget. [`VhostUserServer::stop`] ends the server, even with a
//! frontend connected.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::model::{self, Counters, NetModel};
use super::tap::{FrameDevice, Tap};
use super::{
    NetConfig, NetError, NetStats, NUM_QUEUES, RX_QUEUE_INDEX, TX_QUEUE_INDEX,
    VHOST_USER_QUEUE_SIZE,
};
use crate::guest_log::{guest_warn, GuestLog};
use crate::vhost_user::{self, Sessions};
use crate::VIRTIO_F_VERSION_1;

/// Guest memory as the vhost-user framework shares it (no dirty bitmap).
type GuestMemoryShared = GuestMemoryAtomic<GuestMemoryMmap>;
/// Protocol features we implement: acknowledged requests and memory slots
/// added one at a time, as the other backends. Not CONFIG (QEMU's
/// virtio-net keeps its own config space), not MQ (one queue pair), not
/// NET_MTU (QEMU then simply does not send the MTU, which the backend
/// does not need).
const PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::REPLY_ACK.union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
/// Device event id of the TAP fd. Ids `0..NUM_QUEUES` are the queues and
/// `NUM_QUEUES` is the framework's exit event, so the first id free for
/// backends is `NUM_QUEUES + 1`.
const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Device event id of the resume eventfd.
const RESUME_EVENT: u16 = NUM_QUEUES as u16 + 2;

/// A net device model as a vhost-user backend.
pub struct VhostUserNetBackend {
    memory: GuestMemoryShared,
    model: Mutex<NetModel>,
    /// The virtio features offered (VERSION_1 and the device's own).
    virtio_features: u64,
    /// Written when the model has work left; watched by the vring worker.
    resume: EventFd,
    exit: ExitEvent,
    /// Consumer fds handed to vhost-user-backend, which registers them
    /// with epoll through `into_raw_fd` and never closes them; closed in
    /// `drop`.
    handed_out_consumers: Mutex<Vec<RawFd>>,
}

/// The stop event of the vring worker thread.
struct ExitEvent {
    consumer: EventConsumer,
    notifier: EventNotifier,
}

impl VhostUserNetBackend {
    /// A backend running `model`, reading guest memory through `memory`
    /// (the same object the daemon updates on `SET_MEM_TABLE`).
    fn new(
        model: NetModel,
        supported_features: u64,
        memory: GuestMemoryShared,
    ) -> io::Result<Self> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(Self {
            memory,
            model: Mutex::new(model),
            virtio_features: VIRTIO_F_VERSION_1 | supported_features,
            resume: EventFd::new(EFD_NONBLOCK)?,
            exit: ExitEvent { consumer, notifier },
            handed_out_consumers: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, NetModel>> {
        self.model
            .lock()
            .map_err(|_| io::Error::other("virtio-net backend state poisoned by a panic"))
    }

    /// Runs the model on the vrings, notifies the frontend, and arranges
    /// to come back when work is left.
    fn pump(&self, vrings: &[VringRwLock<GuestMemoryShared>], rx_event: bool) -> io::Result<()> {
        let (Some(rx_vring), Some(tx_vring)) =
            (vrings.get(RX_QUEUE_INDEX), vrings.get(TX_QUEUE_INDEX))
        else {
            return Ok(());
        };
        let memory = self.memory.memory();
        let outcome = {
            let mut model = self.lock()?;
            let mut rx_state = rx_vring.get_mut();
            let mut tx_state = tx_vring.get_mut();
            let result = model.pump(
                &*memory,
                rx_state.get_queue_mut(),
                tx_state.get_queue_mut(),
                rx_event,
            );
            match result {
                Ok(outcome) => outcome,
                Err(error) => {
                    // A ring the frontend has not finished setting up, or
                    // one the guest broke: keep the worker for the next
                    // session, and keep the line within the budget.
                    guest_warn!(model.guest_log(), %error, "vhost-user net: cannot process the queues");
                    return Ok(());
                }
            }
        };
        // The vring locks are released above: signalling takes them again.
        if outcome.tx_used {
            tx_vring.signal_used_queue()?;
        }
        if outcome.rx_used {
            rx_vring.signal_used_queue()?;
        }
        if outcome.more {
            self.resume.write(1)?;
        }
        Ok(())
    }
}

impl Drop for VhostUserNetBackend {
    fn drop(&mut self) {
        let handed_out = match self.handed_out_consumers.get_mut() {
            Ok(fds) => std::mem::take(fds),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        for fd in handed_out {
            // SAFETY: `fd` came from `try_clone` in `exit_event` and was
            // given away through `into_raw_fd` by vhost-user-backend, which
            // never closes it. Every holder of this backend, the vring
            // handler included, is gone (this is the last reference), so
            // nobody else uses or closes the number.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl VhostUserBackend for VhostUserNetBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryShared>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(VHOST_USER_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.virtio_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    fn acked_features(&self, features: u64) {
        // SET_FEATURES starts every driver session (QEMU sends it at each
        // vhost start: boot, guest reset, link up).
        match self.lock() {
            Ok(mut model) => model.set_acked_features(features & self.virtio_features),
            Err(error) => tracing::error!(%error, "cannot apply virtio-net features"),
        }
    }

    fn reset_device(&self) {
        match self.lock() {
            Ok(mut model) => model.set_acked_features(0),
            Err(error) => tracing::error!(%error, "cannot reset the virtio-net model"),
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The framework sets the flag on every vring's queue, and the model
        // asks the queue, so nothing to keep here.
    }

    fn update_memory(&self, _memory: GuestMemoryShared) -> io::Result<()> {
        // `memory` is a clone of the atomic we already hold.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let consumer = self.exit.consumer.try_clone().ok()?;
        let notifier = self.exit.notifier.try_clone().ok()?;
        match self.handed_out_consumers.lock() {
            Ok(mut handed_out) => handed_out.push(consumer.as_raw_fd()),
            Err(poisoned) => poisoned.into_inner().push(consumer.as_raw_fd()),
        }
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            // Transmit is looked at on every pump (see NetModel::pump).
            e if usize::from(e) == RX_QUEUE_INDEX => self.pump(vrings, true),
            e if usize::from(e) == TX_QUEUE_INDEX => self.pump(vrings, false),
            TAP_EVENT => self.pump(vrings, true),
            RESUME_EVENT => {
                // EAGAIN only means the count was already consumed.
                let _ = self.resume.read();
                self.pump(vrings, true)
            }
            other => {
                tracing::warn!(event = other, "unexpected vhost-user net event");
                Ok(())
            }
        }
    }
}

/// A running vhost-user net server; [`Self::stop`] (or drop) ends it.
pub struct VhostUserServer {
    server: vhost_user::Server,
    counters: Arc<Counters>,
}

/// Serves a card with `config`'s identity over `tap` to vhost-user
/// frontends on `socket_path`, one after another, from a new thread
/// confined as a device thread (the daemon and its vring worker, made on
/// it, inherit that). `socket_path` exists when this returns.
pub fn serve_vhost_user(
    socket_path: &Path,
    tap: Tap,
    config: NetConfig,
) -> Result<VhostUserServer, NetError> {
    serve_frame_device(socket_path, Arc::new(tap), config)
}

/// Like [`serve_vhost_user`] over any frame device (the tests' fake TAP).
pub(crate) fn serve_frame_device(
    socket_path: &Path,
    tap: Arc<dyn FrameDevice>,
    config: NetConfig,
) -> Result<VhostUserServer, NetError> {
    config.validate()?;
    let name = format!("vhost-user-net-{}", tap.name());
    let counters = Arc::new(Counters::default());
    let sessions = NetSessions {
        socket_path: socket_path.to_owned(),
        daemon_name: name.clone(),
        tap,
        counters: counters.clone(),
        guest_log: GuestLog::new(),
    };
    let server = vhost_user::serve(
        socket_path,
        &name,
        vhost_user::Confinement::Class(husk_confine::ThreadClass::Device),
        sessions,
    )
    .map_err(|error| NetError::VhostUser {
        path: socket_path.to_owned(),
        message: error.to_string(),
    })?;
    Ok(VhostUserServer { server, counters })
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

    /// What the card has moved and refused so far, over every session.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    /// Ends the server: disconnects a connected frontend, joins the thread
    /// and removes the socket.
    pub fn stop(mut self) {
        self.stop_server();
    }

    fn stop_server(&mut self) {
        if let Err(error) = self.server.stop() {
            tracing::error!(%error, "the vhost-user net server failed");
        }
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A fresh backend for every frontend, over the one TAP.
struct NetSessions {
    socket_path: PathBuf,
    daemon_name: String,
    tap: Arc<dyn FrameDevice>,
    counters: Arc<Counters>,
    /// One budget for every session's guest-triggered lines.
    guest_log: GuestLog,
}

impl NetSessions {
    fn new_daemon(&mut self) -> Result<VhostUserDaemon<Arc<VhostUserNetBackend>>, NetError> {
        let vhost_error = |message: String| NetError::VhostUser {
            path: self.socket_path.clone(),
            message,
        };
        let model = NetModel::new(
            self.tap.clone(),
            self.counters.clone(),
            self.guest_log.clone(),
        );
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            VhostUserNetBackend::new(
                model,
                model::device_features(self.tap.supported_offloads()),
                memory.clone(),
            )
            .map_err(|e| vhost_error(format!("cannot create the backend's eventfds: {e}")))?,
        );
        let daemon = VhostUserDaemon::new(self.daemon_name.clone(), backend.clone(), memory)
            .map_err(|e| vhost_error(e.to_string()))?;
        let tap_fd = self.tap.frame_fd().as_raw_fd();
        for handler in daemon.get_epoll_handlers().iter().take(1) {
            handler
                .register_listener(
                    tap_fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    u64::from(TAP_EVENT),
                )
                .map_err(|e| vhost_error(format!("cannot watch the TAP fd: {e}")))?;
            handler
                .register_listener(
                    backend.resume.as_raw_fd(),
                    EventSet::IN,
                    u64::from(RESUME_EVENT),
                )
                .map_err(|e| vhost_error(format!("cannot watch the resume eventfd: {e}")))?;
        }
        Ok(daemon)
    }
}

impl Sessions for NetSessions {
    type Backend = Arc<VhostUserNetBackend>;

    fn daemon(&mut self) -> Result<VhostUserDaemon<Self::Backend>, String> {
        self.new_daemon().map_err(|error| error.to_string())
    }

    fn serves_again(&self) -> bool {
        // A guest reboot under QEMU, or a QEMU restart, reconnects.
        true
    }
    fn holds_early_vring_enable(&self) -> bool {
        // QEMU's virtio-net attaches its queue pairs, which sends
        // SET_VRING_ENABLE, when the guest writes its features: before
        // vhost_dev_start sends SET_FEATURES.
        true
    }
}
