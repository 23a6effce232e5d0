//! The virtio-fs device model, written once for both transports.
//!
//! A virtio-fs request is one descriptor chain: the device-readable part
//! holds a FUSE request (header, arguments, write payload), the
//! device-writable part receives the FUSE reply (virtio 1.2, 5.11.6). The
//! model turns a chain into fuse-backend-rs's virtio-fs `Reader`/`Writer`,
//! hands them to `Server::handle_message` over a [`PassthroughFs`] rooted at
//! the shared directory, and returns the chain with the reply length.
//! [`FsDeviceModel::process_queue`] drains one queue; each adapter (the
//! built-in MMIO device and the vhost-user backend) owns the threads and
//! the notification plumbing, and calls it when a queue is kicked.
//!
//! The model keeps no per-queue state, so one `Arc<FsDeviceModel>` serves
//! all queues from their own threads; fuse-backend-rs's passthrough file
//! system is internally synchronised. A chain the model cannot use is
//! logged on the device's [`GuestLog`]: the guest can post one per kick.
//!
//! Confinement comes from fuse-backend-rs's passthrough design, which the
//! `fs_confinement` integration tests pin down: every inode is an `O_PATH`
//! fd, names are resolved one component at a time with
//! `openat(parent_fd, name, O_NOFOLLOW)`, names carrying `/` are refused,
//! `..` looked up in the root is rewritten to `.`, only regular files and
//! directories are ever opened for I/O (through `/proc/self/fd`, which
//! addresses the inode itself and never follows a symlink's target), and
//! file handles (`open_by_handle_at`) are disabled in [`super::config`].

use std::cell::Cell;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};

use super::config::{FsConfig, CONFIG_SPACE_LEN};
use super::filesystem::SharedFs;
use super::FsError;
use crate::guest_log::{guest_warn, GuestLog};

/// The virtio device id of a file system device (virtio 1.2, 5 "Device Types").
pub const FS_DEVICE_TYPE: u32 = VIRTIO_ID_FS;
/// Ring features the model supports on any transport: indirect descriptors
/// (virtio-queue walks them) and used/avail event suppression. The transport
/// adds VIRTIO_F_VERSION_1.
pub const FS_RING_FEATURES: u64 =
    (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
/// The event-index feature bit, which changes how queues signal the driver.
pub const EVENT_IDX_FEATURE: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// Serves FUSE requests arriving on virtqueues from one shared directory.
pub struct FsDeviceModel {
    server: Server<Arc<SharedFs>>,
    /// The file system the server serves, for its counters.
    fs: Arc<SharedFs>,
    config_space: [u8; CONFIG_SPACE_LEN],
    num_queues: usize,
    queue_size: u16,
    guest_log: GuestLog,
}

impl FsDeviceModel {
    /// Validates `config` and prepares a passthrough file system rooted at
    /// the shared directory. The root itself is opened when the guest sends
    /// FUSE INIT.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        Self::with_guest_log(config, GuestLog::new())
    }

    /// Like [`Self::new`], logging guest-triggered warnings on `guest_log`
    /// (the adapter's, which outlives the models it builds).
    pub fn with_guest_log(config: &FsConfig, guest_log: GuestLog) -> Result<Self, FsError> {
        let passthrough_config = config.passthrough_config()?;
        let fs = PassthroughFs::new(passthrough_config).map_err(|source| FsError::Passthrough {
            path: config.shared_dir.clone(),
            source,
        })?;
        let fs = Arc::new(SharedFs::new(fs, config, guest_log.clone()));
        Ok(Self {
            server: Server::new(fs.clone()),
            fs,
            config_space: config.config_space(),
            num_queues: config.num_queues(),
            queue_size: config.queue_size,
            guest_log,
        })
    }

    /// The device's budget for guest-triggered log lines.
    pub fn guest_log(&self) -> &GuestLog {
        &self.guest_log
    }

    /// Inodes the guest holds now (at most `max_open_inodes`).
    pub fn open_inodes(&self) -> usize {
        self.fs.open_inodes()
    }

    /// Files and directories the guest has open now (at most
    /// `max_open_handles`).
    pub fn open_handles(&self) -> usize {
        self.fs.open_handles()
    }

    /// Hiprio plus request queues.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// The maximum ring size of each queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Feature bits beyond VIRTIO_F_VERSION_1.
    pub fn features(&self) -> u64 {
        FS_RING_FEATURES
    }

    /// The configuration space: tag and `num_request_queues`.
    pub fn config_space(&self) -> &[u8; CONFIG_SPACE_LEN] {
        &self.config_space
    }

    /// Copies configuration space bytes at `offset` into `data`; bytes past
    /// the end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(available) = self.config_space.get(start..) {
            let len = available.len().min(data.len());
            data[..len].copy_from_slice(&available[..len]);
        }
    }

    /// Serves every chain the driver made available on `queue`, re-checking
    /// after re-enabling notifications so a request that races with the
    /// check is not stranded. Returns whether the driver must be notified.
    pub fn process_queue(
        &self,
        memory: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, virtio_queue::Error> {
        isolate_thread_umask();
        let mut used_any = false;
        loop {
            queue.disable_notification(memory)?;
            while let Some(chain) = queue.iter(memory)?.next() {
                let head_index = chain.head_index();
                let reply_len = self.handle_chain(memory, chain);
                queue.add_used(memory, head_index, reply_len)?;
                used_any = true;
            }
            if !queue.enable_notification(memory)? {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(memory)?)
    }

    /// Serves one request chain and returns the number of reply bytes
    /// written. A malformed chain is logged and returned with length 0 so
    /// the ring keeps moving.
    pub fn handle_chain(
        &self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let head_index = chain.head_index();
        let reader = match Reader::from_descriptor_chain(memory, chain.clone()) {
            Ok(reader) => reader,
            Err(error) => {
                guest_warn!(self.guest_log, %error, head_index, "virtio-fs: unreadable request descriptors");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(memory, chain) {
            Ok(writer) => writer,
            Err(error) => {
                guest_warn!(self.guest_log, %error, head_index, "virtio-fs: unwritable reply descriptors");
                return 0;
            }
        };
        match self
            .server
            .handle_message(reader, writer.into(), None, None)
        {
            // A reply never exceeds the chain, whose length is a u32 sum.
            Ok(written) => u32::try_from(written).unwrap_or(u32::MAX),
            Err(error) => {
                tracing::debug!(%error, head_index, "virtio-fs: request not served");
                0
            }
        }
    }
}

/// Gives the calling thread its own file-system context with umask 0, once.
///
/// The passthrough applies the guest's umask itself and expects the process
/// umask to be 0: it calls `umask(0)` when the guest sends INIT. Here the
/// device runs inside the shim, whose own files must keep the shim's umask,
/// so every thread that serves requests first leaves the shared fs context
/// (`unshare(CLONE_FS)`: cwd, root and umask become per-thread) and only
/// then clears its umask; the INIT-time `umask(0)` then stays in that thread.
fn isolate_thread_umask() {
    thread_local! {
        static ISOLATED: Cell<bool> = const { Cell::new(false) };
    }
    if ISOLATED.get() {
        return;
    }
    ISOLATED.set(true);
    // SAFETY: unshare(CLONE_FS) copies this thread's fs context; no memory
    // is involved and threads may do it in a multithreaded process.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "virtio-fs: cannot give the worker its own umask; INIT will clear the process umask"
        );
        return;
    }
    // SAFETY: umask only changes this thread's (now private) fs context.
    unsafe { libc::umask(0) };
}
