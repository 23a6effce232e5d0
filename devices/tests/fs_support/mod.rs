//! Shared helpers for the virtio-fs integration tests: the request queue
//! as the guest driver fills it (over the test-support crate's
//! `DriverQueue`), and a tiny FUSE client that builds requests the way the Linux virtio-fs
//! driver does (one chain: readable request, writable reply) and decodes
//! the replies.

#![allow(dead_code)]

use fuse_backend_rs::abi::fuse_abi::{
    Attr, BatchForgetIn, CreateIn, Dirent, EntryOut, ForgetIn, ForgetOne, GetxattrIn, GetxattrOut,
    InHeader, InitIn, InitOut, LinkIn, MkdirIn, MknodIn, Opcode, OpenIn, OpenOut, OutHeader,
    ReadIn, ReleaseIn, RenameIn, SetattrIn, SetxattrIn, WriteIn, WriteOut, KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
};
use husk_devices::fs::{FsConfig, FsDeviceModel};
pub use husk_test_support::tempdir::TestDir;
use husk_test_support::virtqueue::DriverQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

/// An interrupt line nobody listens to: the tests poll the used ring.
pub struct NoInterrupt;

impl husk_devices::VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// FUSE id of the root directory.
pub const ROOT_ID: u64 = 1;

/// Ring size of the test queue.
pub const QUEUE_SIZE: u16 = 16;
/// Buffer per descriptor: room for the largest request or reply the suites
/// send (a 128 KiB READ plus its header).
const BUFFER_STRIDE: u64 = 0x3_0000;
/// Guest memory one queue's layout takes (rings, then 16 buffers).
pub const QUEUE_SPAN: u64 = 0x40_0000;

/// The driver's side of one virtio-fs request queue: each request is one
/// chain, a readable request and a writable reply buffer, as the Linux
/// virtio-fs driver posts it. Built on the shared [`DriverQueue`].
pub struct GuestQueue {
    pub memory: GuestMemoryMmap,
    driver: DriverQueue,
    /// The most recent used chain: (head, length, the bytes written).
    last: Option<(u16, u32, Vec<u8>)>,
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
        let driver = DriverQueue::new(&memory, base, QUEUE_SIZE, BUFFER_STRIDE);
        assert!(driver.end() <= base + QUEUE_SPAN, "the queue fits its span");
        Self {
            memory,
            driver,
            last: None,
        }
    }

    /// The device's view of this queue, as a transport would hand it over.
    pub fn device_queue(&self) -> Queue {
        let queue = self.driver.device_queue();
        assert!(queue.is_valid(&self.memory));
        queue
    }

    /// Reaps what the device returned, keeping the latest.
    fn reap(&mut self) {
        while let Some(used) = self.driver.pop_used(&self.memory) {
            self.last = Some(used);
        }
    }

    /// Offers one request with room for a `reply_capacity`-byte reply;
    /// returns the chain's head index.
    pub fn push(&mut self, request: &[u8], reply_capacity: u32) -> u16 {
        self.reap();
        self.driver
            .add_chain(
                &self.memory,
                &[
                    (request.len() as u32, false, request),
                    (reply_capacity, true, &[]),
                ],
            )
            .expect("the test queue has free descriptors")
    }

    /// How many chains the device has returned.
    pub fn used_idx(&self) -> u16 {
        self.driver.used_idx(&self.memory)
    }

    /// The (head index, length) of the most recently used chain.
    pub fn last_used(&mut self) -> (u32, u32) {
        self.reap();
        let (head, len, _) = self.last.as_ref().expect("the device used a chain");
        (u32::from(*head), *len)
    }

    /// The first `len` bytes of the most recent reply.
    pub fn reply_bytes(&mut self, len: u32) -> Vec<u8> {
        self.reap();
        let (_, _, bytes) = self.last.as_ref().expect("the device used a chain");
        bytes[..len as usize].to_vec()
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
        let posted = self.guest.push(&bytes, reply_capacity);
        self.model
            .process_queue(&self.guest.memory, &mut self.queue)
            .unwrap();
        assert_eq!(
            self.guest.used_idx(),
            used_before.wrapping_add(1),
            "the chain came back"
        );
        let (head, len) = self.guest.last_used();
        assert_eq!(head, u32::from(posted), "the used chain is the one posted");
        let bytes = self.guest.reply_bytes(len);
        let header = *OutHeader::from_slice(&bytes[..std::mem::size_of::<OutHeader>()]).unwrap();
        assert_eq!(header.unique, self.unique, "the reply answers this request");
        assert_eq!(header.len, len, "the used length is the reply length");
        Reply {
            header,
            body: bytes[std::mem::size_of::<OutHeader>()..].to_vec(),
        }
    }

    /// Sends a request that gets no reply (FORGET, BATCH_FORGET): the
    /// device returns the chain with nothing written.
    pub fn send_without_reply(&mut self, opcode: Opcode, nodeid: u64, parts: &[&[u8]]) {
        self.unique += 1;
        let bytes = request(opcode, self.unique, nodeid, parts);
        let used_before = self.guest.used_idx();
        let posted = self.guest.push(&bytes, REPLY_CAPACITY);
        self.model
            .process_queue(&self.guest.memory, &mut self.queue)
            .unwrap();
        assert_eq!(
            self.guest.used_idx(),
            used_before.wrapping_add(1),
            "the chain came back"
        );
        assert_eq!(
            self.guest.last_used(),
            (u32::from(posted), 0),
            "no reply for {opcode:?}"
        );
    }

    /// FORGET `nlookup` lookups of `nodeid`.
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) {
        let forget = ForgetIn { nlookup };
        self.send_without_reply(Opcode::Forget, nodeid, &[forget.as_slice()]);
    }

    /// BATCH_FORGET of (node id, lookups) pairs.
    pub fn batch_forget(&mut self, forgets: &[(u64, u64)]) {
        let header = BatchForgetIn {
            count: forgets.len() as u32,
            dummy: 0,
        };
        let mut body = header.as_slice().to_vec();
        for (nodeid, nlookup) in forgets {
            let one = ForgetOne {
                nodeid: *nodeid,
                nlookup: *nlookup,
            };
            body.extend_from_slice(one.as_slice());
        }
        self.send_without_reply(Opcode::BatchForget, 0, &[&body]);
    }

    /// One READDIRPLUS reply's (name, node id) pairs from `offset`; a node
    /// id of 0 means the entry came without a lookup.
    pub fn readdirplus(&mut self, nodeid: u64, fh: u64) -> Result<Vec<(String, u64)>, i32> {
        let read = ReadIn {
            fh,
            offset: 0,
            size: 8192,
            ..Default::default()
        };
        let reply = self.call(Opcode::Readdirplus, nodeid, &[read.as_slice()], 16384);
        reply.check()?;
        let mut entries = Vec::new();
        let mut at = 0;
        let entry_len = std::mem::size_of::<EntryOut>();
        let dirent_len = std::mem::size_of::<Dirent>();
        while at < reply.body.len() {
            let entry = *EntryOut::from_slice(&reply.body[at..at + entry_len]).unwrap();
            let dirent =
                *Dirent::from_slice(&reply.body[at + entry_len..at + entry_len + dirent_len])
                    .unwrap();
            let name_start = at + entry_len + dirent_len;
            let name = &reply.body[name_start..name_start + dirent.namelen as usize];
            entries.push((String::from_utf8(name.to_vec()).unwrap(), entry.nodeid));
            at = (name_start + dirent.namelen as usize + 7) & !7;
        }
        Ok(entries)
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

    /// SETATTR of the mode alone (chmod).
    pub fn chmod(&mut self, nodeid: u64, mode: u32) -> Result<Attr, i32> {
        let setattr = SetattrIn {
            valid: 1, // FATTR_MODE
            mode,
            ..Default::default()
        };
        let out: fuse_backend_rs::abi::fuse_abi::AttrOut = self
            .call(
                Opcode::Setattr,
                nodeid,
                &[setattr.as_slice()],
                REPLY_CAPACITY,
            )
            .parse()?;
        Ok(out.attr)
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
        self.setxattr_with_flags(nodeid, name, value, 0)
    }

    /// SETXATTR with `flags` (`XATTR_CREATE`, `XATTR_REPLACE`).
    pub fn setxattr_with_flags(
        &mut self,
        nodeid: u64,
        name: &str,
        value: &[u8],
        flags: i32,
    ) -> Result<(), i32> {
        let setxattr = SetxattrIn {
            size: value.len() as u32,
            flags: flags as u32,
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

    /// GETXATTR with a buffer of `size` bytes: the value, or with size 0
    /// the value's length (as `GetxattrOut`), as the kernel asks.
    pub fn getxattr_sized(&mut self, nodeid: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let getxattr = GetxattrIn { size, padding: 0 };
        let reply = self.call(
            Opcode::Getxattr,
            nodeid,
            &[getxattr.as_slice(), &cstr(name)],
            REPLY_CAPACITY,
        );
        reply.check()?;
        Ok(reply.body)
    }

    /// LISTXATTR with a buffer of `size` bytes: the names, or with size 0
    /// the list's length (the first four bytes of `GetxattrOut`).
    pub fn listxattr_sized(&mut self, nodeid: u64, size: u32) -> Result<Vec<u8>, i32> {
        let listxattr = GetxattrIn { size, padding: 0 };
        let reply = self.call(
            Opcode::Listxattr,
            nodeid,
            &[listxattr.as_slice()],
            REPLY_CAPACITY,
        );
        reply.check()?;
        Ok(reply.body)
    }

    /// The names LISTXATTR returns, probing for the size first like the
    /// kernel does.
    pub fn listxattr(&mut self, nodeid: u64) -> Result<Vec<String>, i32> {
        let probe = self.listxattr_sized(nodeid, 0)?;
        let size = u32::from_le_bytes(probe[..4].try_into().unwrap());
        if size == 0 {
            return Ok(Vec::new());
        }
        let names = self.listxattr_sized(nodeid, size)?;
        assert_eq!(
            names.len(),
            size as usize,
            "the list is as long as the probe said"
        );
        Ok(names
            .split(|byte| *byte == 0)
            .filter(|name| !name.is_empty())
            .map(|name| String::from_utf8(name.to_vec()).unwrap())
            .collect())
    }

    pub fn removexattr(&mut self, nodeid: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Removexattr, nodeid, &[&cstr(name)], REPLY_CAPACITY)
            .check()
    }
}
