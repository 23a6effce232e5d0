//! The virtio-fs model served over vhost-user, for an external VMM.
//!
//! [`VhostUserFsBackend`] adapts [`FsDeviceModel`] to vhost-user-backend's
//! [`VhostUserBackend`]: one vring worker thread per queue (hiprio and each
//! request queue), each draining its queue when the frontend kicks it.
//! [`serve_vhost_user`] builds the backend and binds the socket (so a bad
//! configuration or path fails the call, not the thread), then serves the
//! first frontend that connects (QEMU's `vhost-user-fs-device`, guest memory
//! shared through memfd) through the shared server ([`crate::vhost_user`]).
//! The server ends with that session: when the frontend disconnects or
//! [`VhostUserServer::stop`] is called, even with the frontend connected.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::FsConfig;
use super::model::FsDeviceModel;
use super::FsError;
use crate::guest_log::guest_warn;
use crate::vhost_user::{self, Sessions};
use crate::VIRTIO_F_VERSION_1;

/// Protocol features we implement: several queues (so QEMU checks our
/// queue count against `num-request-queues`), acknowledged requests, and
/// memory slots added one at a time.
const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
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
                guest_warn!(self.model.guest_log(), %error, queue = queue_index, "vhost-user-fs: cannot process queue")
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
        VIRTIO_F_VERSION_1
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
    server: vhost_user::Server,
}

/// Builds the backend for `config`, binds `socket_path` (replacing a stale
/// socket) and serves the first frontend that connects, from a new thread.
pub fn serve_vhost_user(socket_path: &Path, config: FsConfig) -> Result<VhostUserServer, FsError> {
    let backend = Arc::new(VhostUserFsBackend::new(&config)?);
    let name = format!("{DAEMON_THREAD_NAME}-server");
    // The daemon (and with it its vring workers) is made on the server
    // thread, after that thread confined itself: the workers inherit it.
    let share = config.resolved_shared_dir()?;
    let server = vhost_user::serve(
        socket_path,
        &name,
        vhost_user::Confinement::FsShare(share),
        FirstFrontend(Some(backend)),
    )?;
    tracing::info!(socket = %socket_path.display(), tag = %config.tag, "vhost-user-fs listening");
    Ok(VhostUserServer { server })
}

impl VhostUserServer {
    /// The socket the frontend connects to.
    pub fn socket_path(&self) -> &Path {
        self.server.socket_path()
    }

    /// Whether the session has ended (frontend gone or never coming back).
    pub fn is_finished(&self) -> bool {
        self.server.is_finished()
    }

    /// Ends the session, joins every thread and removes the socket. Returns
    /// the session's own error, if it failed before the stop.
    pub fn stop(mut self) -> Result<(), FsError> {
        Ok(self.server.stop()?)
    }
}

/// The first frontend only: the shim starts one QEMU per share, and the
/// server ends with that session.
struct FirstFrontend(Option<Arc<VhostUserFsBackend>>);

impl Sessions for FirstFrontend {
    type Backend = Arc<VhostUserFsBackend>;

    fn daemon(&mut self) -> Result<VhostUserDaemon<Self::Backend>, String> {
        let backend = self
            .0
            .take()
            .ok_or_else(|| "the virtio-fs share was already served to a frontend".to_owned())?;
        let daemon_memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        VhostUserDaemon::new(DAEMON_THREAD_NAME.to_owned(), backend, daemon_memory)
            .map_err(|error| format!("cannot make the vhost-user-fs daemon: {error}"))
    }

    fn serves_again(&self) -> bool {
        false
    }
}
