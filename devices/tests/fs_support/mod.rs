//! Shared helpers for the virtio-fs integration tests: a scratch directory,
//! a split virtqueue laid out by hand in guest memory (the driver's side),
//! and a tiny FUSE client that builds requests the way the Linux virtio-fs
//! driver does (one chain: readable request, writable reply) and decodes
//! the replies.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use fuse_backend_rs::abi::fuse_abi::{
    Attr, CreateIn, Dirent, EntryOut, GetxattrIn, GetxattrOut, InHeader, InitIn, InitOut, LinkIn,
    MkdirIn, MknodIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetxattrIn,
    WriteIn, WriteOut, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use husk_devices::fs::{FsConfig, FsDeviceModel};
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// FUSE id of the root directory.
pub const ROOT_ID: u64 = 1;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "husk-fs-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        // Canonical, so paths built from it match what the kernel reports
        // (mountinfo, /proc/self/fd) even when TMPDIR goes through a symlink.
        let path = path.canonicalize().unwrap();
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Ring size of the test queue.
pub const QUEUE_SIZE: u16 = 16;
/// Layout of one queue, relative to its base in guest memory.
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const REQUEST_BUFFER: u64 = 0x1_0000;
const REPLY_BUFFER: u64 = 0x20_0000;
/// Guest memory one queue's layout takes.
pub const QUEUE_SPAN: u64 = 0x40_0000;
/// VIRTQ_DESC_F_NEXT and VIRTQ_DESC_F_WRITE (virtio 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The driver's side of one split virtqueue in guest memory.
pub struct GuestQueue {
    pub memory: GuestMemoryMmap,
    base: u64,
    next_avail: u16,
}

/// Guest memory big enough for `queues` test queues.
pub fn guest_memory(queues: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (QUEUE_SPAN * queues) as usize)]).unwrap()
}

impl Default for GuestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestQueue {
    pub fn new() -> Self {
        Self::at(guest_memory(1), 0)
    }

    /// A queue whose rings and buffers start at `base` in `memory`.
    pub fn at(memory: GuestMemoryMmap, base: u64) -> Self {
        Self {
            memory,
            base,
            next_avail: 0,
        }
    }

    /// The device's view of this queue, as a transport would hand it over.
    pub fn device_queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some((self.base + DESC_TABLE) as u32), Some(0));
        queue.set_avail_ring_address(Some((self.base + AVAIL_RING) as u32), Some(0));
        queue.set_used_ring_address(Some((self.base + USED_RING) as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&self.memory));
        queue
    }

    /// Offers one request: descriptor 0 readable (the request), descriptor 1
    /// writable (room for the reply).
    pub fn push(&mut self, request: &[u8], reply_capacity: u32) {
        let request_buffer = self.base + REQUEST_BUFFER;
        self.memory
            .write_slice(request, GuestAddress(request_buffer))
            .unwrap();
        self.write_descriptor(0, request_buffer, request.len() as u32, DESC_F_NEXT, 1);
        self.write_descriptor(1, self.base + REPLY_BUFFER, reply_capacity, DESC_F_WRITE, 0);
        let slot = self.base + AVAIL_RING + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        self.memory.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.memory
            .write_obj(self.next_avail, GuestAddress(self.base + AVAIL_RING + 2))
            .unwrap();
    }

    fn write_descriptor(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.base + DESC_TABLE + 16 * index;
        self.memory.write_obj(addr, GuestAddress(base)).unwrap();
        self.memory.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.memory
            .write_obj(flags, GuestAddress(base + 12))
            .unwrap();
        self.memory
            .write_obj(next, GuestAddress(base + 14))
            .unwrap();
    }

    /// How many chains the device has returned.
    pub fn used_idx(&self) -> u16 {
        self.memory
            .read_obj(GuestAddress(self.base + USED_RING + 2))
            .unwrap()
    }

    /// The (head index, length) of the most recently used chain.
    pub fn last_used(&self) -> (u32, u32) {
        let slot =
            self.base + USED_RING + 4 + 8 * u64::from(self.used_idx().wrapping_sub(1) % QUEUE_SIZE);
        let id: u32 = self.memory.read_obj(GuestAddress(slot)).unwrap();
        let len: u32 = self.memory.read_obj(GuestAddress(slot + 4)).unwrap();
        (id, len)
    }

    /// The first `len` bytes of the reply buffer.
    pub fn reply_bytes(&self, len: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; len as usize];
        self.memory
            .read_slice(&mut bytes, GuestAddress(self.base + REPLY_BUFFER))
            .unwrap();
        bytes
    }
}

/// A decoded FUSE reply.
pub struct Reply {
    pub header: OutHeader,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as `T`, or the errno the server answered with.
    pub fn parse<T: ByteValued>(&self) -> Result<T, i32> {
        self.check()?;
        Ok(T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .unwrap())
    }

    /// Ok for a success, the positive errno otherwise.
    pub fn check(&self) -> Result<(), i32> {
        if self.header.error == 0 {
            Ok(())
        } else {
            Err(-self.header.error)
        }
    }
}

/// Builds a request: header, fixed argument struct(s) and strings.
pub fn request(opcode: Opcode, unique: u64, nodeid: u64, parts: &[&[u8]]) -> Vec<u8> {
    let body_len: usize = parts.iter().map(|part| part.len()).sum();
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + body_len) as u32,
        opcode: opcode as u32,
        unique,
        nodeid,
        uid: 0,
        gid: 0,
        pid: std::process::id(),
        padding: 0,
    };
    let mut bytes = header.as_slice().to_vec();
    for part in parts {
        bytes.extend_from_slice(part);
    }
    bytes
}

/// A NUL-terminated name.
pub fn cstr(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Reply room for ordinary requests.
const REPLY_CAPACITY: u32 = 0x1_0000;

/// A FUSE client talking to a device model through a hand-built queue.
pub struct FuseClient {
    pub guest: GuestQueue,
    pub queue: Queue,
    pub model: FsDeviceModel,
    unique: u64,
}

impl FuseClient {
    /// A client over a fresh device model for `config`, already past INIT.
    pub fn new(config: &FsConfig) -> Self {
        let mut client = Self::uninitialised(config);
        let init = client.init().unwrap();
        assert_eq!(init.major, KERNEL_VERSION);
        client
    }

    /// A client that has not sent INIT yet.
    pub fn uninitialised(config: &FsConfig) -> Self {
        let guest = GuestQueue::new();
        let queue = guest.device_queue();
        let model = FsDeviceModel::new(config).unwrap();
        Self {
            guest,
            queue,
            model,
            unique: 0,
        }
    }

    /// Sends one request and lets the device model drain the queue.
    pub fn call(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        parts: &[&[u8]],
        reply_capacity: u32,
    ) -> Reply {
        self.unique += 1;
        let bytes = request(opcode, self.unique, nodeid, parts);
        let used_before = self.guest.used_idx();
        self.guest.push(&bytes, reply_capacity);
        self.model
            .process_queue(&self.guest.memory, &mut self.queue)
            .unwrap();
        assert_eq!(
            self.guest.used_idx(),
            used_before.wrapping_add(1),
            "the chain came back"
        );
        let (head, len) = self.guest.last_used();
        assert_eq!(head, 0);
        let bytes = self.guest.reply_bytes(len);
        let header = *OutHeader::from_slice(&bytes[..std::mem::size_of::<OutHeader>()]).unwrap();
        assert_eq!(header.unique, self.unique, "the reply answers this request");
        assert_eq!(header.len, len, "the used length is the reply length");
        Reply {
            header,
            body: bytes[std::mem::size_of::<OutHeader>()..].to_vec(),
        }
    }

    /// INIT offering no optional flags.
    pub fn init(&mut self) -> Result<InitOut, i32> {
        self.init_with_flags(0)
    }

    /// INIT offering `flags` (the low 32 bits, as a 7.33 kernel sends them).
    pub fn init_with_flags(&mut self, flags: u32) -> Result<InitOut, i32> {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0x2_0000,
            flags,
        };
        self.call(Opcode::Init, 0, &[init.as_slice()], REPLY_CAPACITY)
            .parse()
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        self.call(Opcode::Lookup, parent, &[&cstr(name)], REPLY_CAPACITY)
            .parse()
    }

    pub fn getattr(&mut self, nodeid: u64) -> Result<Attr, i32> {
        let args = [0u8; 16]; // GetattrIn: flags, dummy, fh
        let out: fuse_backend_rs::abi::fuse_abi::AttrOut = self
            .call(Opcode::Getattr, nodeid, &[&args], REPLY_CAPACITY)
            .parse()?;
        Ok(out.attr)
    }

    pub fn open(&mut self, nodeid: u64, flags: i32) -> Result<OpenOut, i32> {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Open, nodeid, &[open.as_slice()], REPLY_CAPACITY)
            .parse()
    }

    pub fn opendir(&mut self, nodeid: u64) -> Result<OpenOut, i32> {
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Opendir, nodeid, &[open.as_slice()], REPLY_CAPACITY)
            .parse()
    }

    pub fn release(&mut self, nodeid: u64, fh: u64) -> Result<(), i32> {
        let release = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(
            Opcode::Release,
            nodeid,
            &[release.as_slice()],
            REPLY_CAPACITY,
        )
        .check()
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(EntryOut, OpenOut), i32> {
        let create = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        let reply = self.call(
            Opcode::Create,
            parent,
            &[create.as_slice(), &cstr(name)],
            REPLY_CAPACITY,
        );
        let entry: EntryOut = reply.parse()?;
        let open_offset = std::mem::size_of::<EntryOut>();
        let open = *OpenOut::from_slice(
            &reply.body[open_offset..open_offset + std::mem::size_of::<OpenOut>()],
        )
        .unwrap();
        Ok((entry, open))
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let read = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let capacity = size + std::mem::size_of::<OutHeader>() as u32;
        let reply = self.call(Opcode::Read, nodeid, &[read.as_slice()], capacity);
        reply.check()?;
        Ok(reply.body)
    }

    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let write = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let out: WriteOut = self
            .call(
                Opcode::Write,
                nodeid,
                &[write.as_slice(), data],
                REPLY_CAPACITY,
            )
            .parse()?;
        Ok(out.size)
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<EntryOut, i32> {
        let mknod = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        self.call(
            Opcode::Mknod,
            parent,
            &[mknod.as_slice(), &cstr(name)],
            REPLY_CAPACITY,
        )
        .parse()
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let mkdir = MkdirIn { mode, umask: 0 };
        self.call(
            Opcode::Mkdir,
            parent,
            &[mkdir.as_slice(), &cstr(name)],
            REPLY_CAPACITY,
        )
        .parse()
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Unlink, parent, &[&cstr(name)], REPLY_CAPACITY)
            .check()
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
    ) -> Result<(), i32> {
        let rename = RenameIn { newdir: new_parent };
        self.call(
            Opcode::Rename,
            parent,
            &[rename.as_slice(), &cstr(name), &cstr(new_name)],
            REPLY_CAPACITY,
        )
        .check()
    }

    pub fn link(&mut self, nodeid: u64, new_parent: u64, new_name: &str) -> Result<EntryOut, i32> {
        let link = LinkIn { oldnodeid: nodeid };
        self.call(
            Opcode::Link,
            new_parent,
            &[link.as_slice(), &cstr(new_name)],
            REPLY_CAPACITY,
        )
        .parse()
    }

    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, i32> {
        self.call(
            Opcode::Symlink,
            parent,
            &[&cstr(name), &cstr(target)],
            REPLY_CAPACITY,
        )
        .parse()
    }

    pub fn readlink(&mut self, nodeid: u64) -> Result<String, i32> {
        let reply = self.call(Opcode::Readlink, nodeid, &[], REPLY_CAPACITY);
        reply.check()?;
        Ok(String::from_utf8(reply.body).unwrap())
    }

    /// Every (name, inode, type) READDIR returns for an open directory.
    pub fn readdir(&mut self, nodeid: u64, fh: u64) -> Result<Vec<(String, u64, u32)>, i32> {
        let mut entries = Vec::new();
        let mut offset = 0;
        loop {
            let read = ReadIn {
                fh,
                offset,
                size: 4096,
                ..Default::default()
            };
            let reply = self.call(Opcode::Readdir, nodeid, &[read.as_slice()], 8192);
            reply.check()?;
            if reply.body.is_empty() {
                return Ok(entries);
            }
            let mut at = 0;
            while at < reply.body.len() {
                let dirent =
                    *Dirent::from_slice(&reply.body[at..at + std::mem::size_of::<Dirent>()])
                        .unwrap();
                let name_start = at + std::mem::size_of::<Dirent>();
                let name = &reply.body[name_start..name_start + dirent.namelen as usize];
                entries.push((
                    String::from_utf8(name.to_vec()).unwrap(),
                    dirent.ino,
                    dirent.type_,
                ));
                offset = dirent.off;
                // Each entry is padded to 8 bytes.
                at = (name_start + dirent.namelen as usize + 7) & !7;
            }
        }
    }

    pub fn setxattr(&mut self, nodeid: u64, name: &str, value: &[u8]) -> Result<(), i32> {
        let setxattr = SetxattrIn {
            size: value.len() as u32,
            flags: 0,
        };
        self.call(
            Opcode::Setxattr,
            nodeid,
            &[setxattr.as_slice(), &cstr(name), value],
            REPLY_CAPACITY,
        )
        .check()
    }

    pub fn getxattr(&mut self, nodeid: u64, name: &str) -> Result<Vec<u8>, i32> {
        // First ask for the size, as the kernel does for getxattr(2) with size 0.
        let probe = GetxattrIn {
            size: 0,
            padding: 0,
        };
        let size: GetxattrOut = self
            .call(
                Opcode::Getxattr,
                nodeid,
                &[probe.as_slice(), &cstr(name)],
                REPLY_CAPACITY,
            )
            .parse()?;
        let fetch = GetxattrIn {
            size: size.size,
            padding: 0,
        };
        let reply = self.call(
            Opcode::Getxattr,
            nodeid,
            &[fetch.as_slice(), &cstr(name)],
            REPLY_CAPACITY,
        );
        reply.check()?;
        Ok(reply.body)
    }
}
