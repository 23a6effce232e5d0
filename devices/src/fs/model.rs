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
use vm_memory::{ByteValued, GuestMemoryMmap};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
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
            if !crate::virtio::rearm_and_recheck(queue, memory)? {
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
        let mut writer = match VirtioFsWriter::new(memory, chain) {
            Ok(writer) => writer,
            Err(error) => {
                guest_warn!(self.guest_log, %error, head_index, "virtio-fs: unwritable reply descriptors");
                return 0;
            }
        };
        if let Some((unique, errno)) = refused_before_the_server(&reader) {
            tracing::debug!(
                errno,
                head_index,
                "virtio-fs: request refused before the server"
            );
            crate::counters::fs_request(true);
            return reply_error(&mut writer, unique, errno);
        }
        let served = self
            .server
            .handle_message(reader, writer.into(), None, None);
        crate::counters::fs_request(served.is_err());
        match served {
            // A reply never exceeds the chain, whose length is a u32 sum.
            Ok(written) => u32::try_from(written).unwrap_or(u32::MAX),
            Err(error) => {
                tracing::debug!(%error, head_index, "virtio-fs: request not served");
                0
            }
        }
    }
}

/// Every variant of fuse-backend-rs's `Opcode` below `MaxOpcode`.
const OPCODE_VARIANTS: [Opcode; 47] = [
    Opcode::Lookup,
    Opcode::Forget,
    Opcode::Getattr,
    Opcode::Setattr,
    Opcode::Readlink,
    Opcode::Symlink,
    Opcode::Mknod,
    Opcode::Mkdir,
    Opcode::Unlink,
    Opcode::Rmdir,
    Opcode::Rename,
    Opcode::Link,
    Opcode::Open,
    Opcode::Read,
    Opcode::Write,
    Opcode::Statfs,
    Opcode::Release,
    Opcode::Fsync,
    Opcode::Setxattr,
    Opcode::Getxattr,
    Opcode::Listxattr,
    Opcode::Removexattr,
    Opcode::Flush,
    Opcode::Init,
    Opcode::Opendir,
    Opcode::Readdir,
    Opcode::Releasedir,
    Opcode::Fsyncdir,
    Opcode::Getlk,
    Opcode::Setlk,
    Opcode::Setlkw,
    Opcode::Access,
    Opcode::Create,
    Opcode::Interrupt,
    Opcode::Bmap,
    Opcode::Destroy,
    Opcode::Ioctl,
    Opcode::Poll,
    Opcode::NotifyReply,
    Opcode::BatchForget,
    Opcode::Fallocate,
    Opcode::Readdirplus,
    Opcode::Rename2,
    Opcode::Lseek,
    Opcode::CopyFileRange,
    Opcode::SetupMapping,
    Opcode::RemoveMapping,
];

/// Whether fuse-backend-rs can turn `opcode` into its `Opcode` enum.
///
/// Its `Opcode::from(u32)` transmutes every value below `MaxOpcode`, so a
/// value that names no variant (0, 7 and 19 in 0.14) becomes an invalid
/// enum: undefined behaviour, and an abort where debug assertions are on.
/// The server makes that conversion for every request whenever `log` is at
/// trace level, which the shim's tracing subscriber sets for
/// `log_level = "trace"`. Such requests never reach the server.
pub fn opcode_is_representable(opcode: u32) -> bool {
    opcode >= Opcode::MaxOpcode as u32 || OPCODE_VARIANTS.iter().any(|v| *v as u32 == opcode)
}

/// FUSE_OPEN, FUSE_OPENDIR and FUSE_CREATE: their argument structs start
/// with the `open(2)` flags.
const OPCODE_OPEN: u32 = Opcode::Open as u32;
const OPCODE_OPENDIR: u32 = Opcode::Opendir as u32;
const OPCODE_CREATE: u32 = Opcode::Create as u32;
/// FUSE_GETXATTR and FUSE_LISTXATTR: their argument structs start with the
/// size of the caller's buffer.
const OPCODE_GETXATTR: u32 = Opcode::Getxattr as u32;
const OPCODE_LISTXATTR: u32 = Opcode::Listxattr as u32;
/// Linux's `XATTR_SIZE_MAX` and `XATTR_LIST_MAX`: the VFS clamps every
/// getxattr(2) and listxattr(2) buffer to this, so a Linux guest never asks
/// for more.
const XATTR_BUFFER_MAX: u32 = 64 * 1024;

/// The requests answered here, never handed to the server: the request's
/// `unique` and the errno to answer with.
///
/// * Opcodes fuse-backend-rs cannot name ([`opcode_is_representable`]):
///   ENOSYS, what the server answers for opcodes it does not implement.
/// * OPEN, OPENDIR and CREATE with `O_PATH`: EINVAL. Linux's FUSE client never sends
///   it (an `O_PATH` open does not reach the file system); the passthrough
///   would hand it to `openat` and keep an `O_PATH` fd as a file handle, on
///   which fuse-backend-rs's READ and WRITE fail `fcntl(F_SETFL)` and then
///   close the handle's fd while the handle still names it: the next fd
///   the process opens gets that number, and the guest's handle with it.
/// * GETXATTR and LISTXATTR for more than [`XATTR_BUFFER_MAX`] bytes:
///   ERANGE. The passthrough allocates the guest's size up front, so a
///   4 GiB request would be a 4 GiB allocation in the shim.
fn refused_before_the_server(reader: &Reader<'_>) -> Option<(u64, i32)> {
    let mut reader = reader.clone();
    let header = reader.read_obj::<InHeader>().ok()?;
    if !opcode_is_representable(header.opcode) {
        return Some((header.unique, libc::ENOSYS));
    }
    match header.opcode {
        OPCODE_OPEN | OPCODE_OPENDIR | OPCODE_CREATE => {
            let flags = reader.read_obj::<u32>().ok()?;
            (flags & libc::O_PATH as u32 != 0).then_some((header.unique, libc::EINVAL))
        }
        OPCODE_GETXATTR | OPCODE_LISTXATTR => {
            let size = reader.read_obj::<u32>().ok()?;
            (size > XATTR_BUFFER_MAX).then_some((header.unique, libc::ERANGE))
        }
        _ => None,
    }
}

/// Answers request `unique` with `errno`; returns the reply length (0 if
/// it could not be written).
fn reply_error(writer: &mut VirtioFsWriter<'_>, unique: u64, errno: i32) -> u32 {
    let header = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    match std::io::Write::write_all(writer, header.as_slice()) {
        Ok(()) => header.len,
        Err(error) => {
            tracing::debug!(%error, "virtio-fs: cannot write an error reply");
            0
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

#[cfg(test)]
mod tests {
    use super::*;
    use husk_test_support::tempdir::TestDir;
    use husk_test_support::virtqueue::DriverQueue;
    use vm_memory::GuestAddress;

    /// One request on a fresh ring: the reply's header and body.
    fn request(
        model: &FsDeviceModel,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
    ) -> (OutHeader, Vec<u8>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut driver = DriverQueue::new(&mem, 0x1000, 8, 0x1000);
        let mut queue = driver.device_queue();
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: 77,
            nodeid,
            ..Default::default()
        };
        let mut wire = header.as_slice().to_vec();
        wire.extend_from_slice(body);
        driver
            .add_chain(
                &mem,
                &[(wire.len() as u32, false, &wire), (4096, true, &[])],
            )
            .unwrap();
        model.process_queue(&mem, &mut queue).unwrap();
        let (_, len, reply) = driver.pop_used(&mem).unwrap();
        assert!(len >= 16, "opcode {opcode}: {len}-byte reply");
        let out = OutHeader::from_slice(&reply[..16]).copied().unwrap();
        assert_eq!(out.unique, 77);
        (out, reply[16..].to_vec())
    }

    #[test]
    fn an_o_path_open_or_opendir_is_refused_so_no_handle_holds_an_o_path_fd() {
        // Caught by the fuse_requests fuzz target: OPEN with O_PATH kept an
        // O_PATH fd as a handle; WRITE on it failed fcntl(F_SETFL) and
        // fuse-backend-rs closed the handle's fd while the handle still
        // named it (a double close when the model dropped it).
        let dir = TestDir::new("fs-o-path").unwrap();
        std::fs::write(dir.join("f"), b"x").unwrap();
        let model = FsDeviceModel::new(&FsConfig::new(dir.path())).unwrap();
        let init = [7u32, 31, 0, 0].map(u32::to_le_bytes).concat();
        assert_eq!(request(&model, Opcode::Init as u32, 0, &init).0.error, 0);
        let (lookup, entry) = request(&model, Opcode::Lookup as u32, 1, b"f\0");
        assert_eq!(lookup.error, 0);
        let nodeid = u64::from_le_bytes(entry[..8].try_into().unwrap());
        let o_path = (libc::O_PATH | libc::O_RDWR) as u32;
        let open = [o_path, 0].map(u32::to_le_bytes).concat();
        let (reply, _) = request(&model, Opcode::Open as u32, nodeid, &open);
        assert_eq!(reply.error, -libc::EINVAL);
        // The fuzz target's second reproducer: OPENDIR of the root.
        let (reply, _) = request(&model, Opcode::Opendir as u32, 1, &open);
        assert_eq!(reply.error, -libc::EINVAL);
        let create = [o_path | libc::O_CREAT as u32, 0o644, 0, 0]
            .map(u32::to_le_bytes)
            .concat();
        let mut body = create;
        body.extend_from_slice(b"g\0");
        let (reply, _) = request(&model, Opcode::Create as u32, 1, &body);
        assert_eq!(reply.error, -libc::EINVAL);
        assert!(!dir.join("g").exists());
        let open = [libc::O_RDWR as u32, 0].map(u32::to_le_bytes).concat();
        assert_eq!(
            request(&model, Opcode::Open as u32, nodeid, &open).0.error,
            0
        );
    }

    #[test]
    fn an_xattr_buffer_larger_than_linux_ever_asks_for_is_refused() {
        // Caught by the fuse_requests fuzz target: LISTXATTR with a size of
        // u32::MAX made the passthrough allocate 4 GiB.
        let dir = TestDir::new("fs-xattr-size").unwrap();
        let model = FsDeviceModel::new(&FsConfig::new(dir.path())).unwrap();
        let init = [7u32, 31, 0, 0].map(u32::to_le_bytes).concat();
        assert_eq!(request(&model, Opcode::Init as u32, 0, &init).0.error, 0);
        for size in [u32::MAX, XATTR_BUFFER_MAX + 1] {
            let body = [size, 0].map(u32::to_le_bytes).concat();
            let (reply, _) = request(&model, Opcode::Listxattr as u32, 1, &body);
            assert_eq!(reply.error, -libc::ERANGE, "LISTXATTR of {size}");
            let mut body = body.clone();
            body.extend_from_slice(b"user.x\0");
            let (reply, _) = request(&model, Opcode::Getxattr as u32, 1, &body);
            assert_eq!(reply.error, -libc::ERANGE, "GETXATTR of {size}");
        }
        let body = [0u32, 0].map(u32::to_le_bytes).concat();
        let (reply, _) = request(&model, Opcode::Listxattr as u32, 1, &body);
        assert_eq!(reply.error, 0, "a size probe still works");
    }

    #[test]
    fn the_opcodes_fuse_backend_rs_cannot_name_are_the_gaps_in_its_enum() {
        let unnamed: Vec<u32> = (0..Opcode::MaxOpcode as u32 + 16)
            .filter(|&opcode| !opcode_is_representable(opcode))
            .collect();
        assert_eq!(unnamed, [0, 7, 19]);
    }

    /// Formats every `log` record, as the shim's subscriber does at trace.
    struct FormatAll;
    impl log::Log for FormatAll {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let _ = std::fmt::format(*record.args());
        }
        fn flush(&self) {}
    }

    #[test]
    fn an_opcode_without_a_name_gets_enosys_even_with_trace_logging() {
        // Caught by the fuse_requests fuzz target (seed-lies, opcodes 0
        // and 7): with `log` at trace, fuse-backend-rs's server turned the
        // opcode into an invalid enum, which aborts the process.
        static LOGGER: FormatAll = FormatAll;
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
        let dir = TestDir::new("fs-opcode").unwrap();
        let model = FsDeviceModel::new(&FsConfig::new(dir.path())).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut driver = DriverQueue::new(&mem, 0x1000, 8, 0x1000);
        let mut queue = driver.device_queue();
        for (opcode, unique) in [(7u32, 11u64), (0, 13), (19, 15)] {
            let header = InHeader {
                len: std::mem::size_of::<InHeader>() as u32,
                opcode,
                unique,
                ..Default::default()
            };
            driver
                .add_chain(&mem, &[(40, false, header.as_slice()), (64, true, &[])])
                .unwrap();
            model.process_queue(&mem, &mut queue).unwrap();
            let (_, len, reply) = driver.pop_used(&mem).unwrap();
            assert_eq!(len, 16, "opcode {opcode}");
            let out = OutHeader::from_slice(&reply).copied().unwrap();
            assert_eq!(out.error, -libc::ENOSYS, "opcode {opcode}");
            assert_eq!(out.unique, unique);
        }
    }
}
