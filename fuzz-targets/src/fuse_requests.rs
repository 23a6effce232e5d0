//! `fuse_requests`: a stream of FUSE requests served by the virtio-fs
//! device model (`husk_devices::fs::FsDeviceModel`, fuse-backend-rs's
//! server over husk's passthrough file system) through a real virtqueue.
//!
//! Each process makes one directory with two children: `root`, the share,
//! and `sentinel`, beside it, which the guest must never reach. Every
//! input starts from a fresh share (a few files, a directory, and symlinks
//! that lead out of it into the sentinel: `up -> ../sentinel`,
//! `secret -> ../sentinel/secret` and an absolute one) and a fresh model.
//!
//! The input's first byte picks the cache policy and xattr support and
//! whether the harness sends INIT first; then each request is an opcode
//! (from the FUSE opcode list, or any u32), a node id (the root, one the
//! device returned earlier, or any), an argument struct, up to two names
//! (from a list that includes `..`, the escaping symlinks and names with
//! `/`, or any bytes), file handles and node ids the device returned
//! patched into the argument struct, an optional data tail, a lying
//! header length, credentials, and a descriptor layout (one or several
//! readable descriptors, a reply buffer from none to 128 KiB).
//!
//! Oracle: no panic; every reply is a well-formed FUSE reply to its
//! request (length, `unique`, an errno in range); after the input, the
//! sentinel (names, types, modes, owners, sizes, times, link counts,
//! contents, link targets, xattrs) and the listing of the directory
//! holding the share are exactly as before, the share holds no device
//! node but the 0/0 whiteout, and no file descriptor outlived the model.
//! Files are capped at 16 MiB (`RLIMIT_FSIZE`) so a guest cannot fill the
//! host's disk from the fuzzer.
//!
//! The `log` crate is at trace level with a logger that formats every
//! record: the shim's tracing subscriber forwards `log` records
//! (tracing-log) at the configured level, so with `log_level = "trace"`
//! fuse-backend-rs's trace lines run, with what they format from guest
//! requests.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use husk_devices::fs::{CachePolicy, FsConfig, FsDeviceModel};
use husk_test_support::virtqueue::DriverQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::input::Input;
use crate::vsock_guest::open_fds;

/// Size of `struct fuse_in_header`.
const IN_HEADER_LEN: usize = 40;
/// Size of `struct fuse_out_header`.
const OUT_HEADER_LEN: usize = 16;
/// Size of `struct fuse_entry_out`: where CREATE's `fuse_open_out` starts.
const ENTRY_OUT_LEN: usize = 128;
/// The root's node id.
const ROOT_ID: u64 = 1;

/// FUSE opcodes (`include/uapi/linux/fuse.h`).
mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const CREATE: u32 = 35;
    pub const BATCH_FORGET: u32 = 42;
    /// Every opcode up to REMOVEMAPPING, and a few after.
    pub const ALL: [u32; 51] = [
        1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 27,
        28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50,
        51, 0, 7,
    ];
}

/// Names the guest is likely to try.
const NAMES: [&[u8]; 16] = [
    b"hello.txt",
    b"dir",
    b"nested",
    b"empty",
    b"up",
    b"secret",
    b"abs",
    b"..",
    b".",
    b"new",
    b"new2",
    b"dir/nested",
    b"../sentinel",
    b"/",
    b"",
    b"sentinel",
];

/// Operations per input.
const MAX_REQUESTS: usize = 64;
/// Reply buffer sizes the guest offers.
const REPLY_SIZES: [u32; 4] = [0, OUT_HEADER_LEN as u32, 4096, 128 * 1024];
/// Data tails (a WRITE's payload, an xattr value) beyond the argument struct.
const TAIL_SIZES: [usize; 6] = [0, 0, 0, 16, 4096, 64 * 1024];
/// Largest file the guest may make: keeps FALLOCATE and WRITE at high
/// offsets from filling the host's disk.
const FILE_SIZE_LIMIT: u64 = 16 << 20;

const QUEUE_SIZE: u16 = 16;
const BUF_STRIDE: u64 = 0x2_0000;
const MEM_SIZE: usize = 4 << 20;

/// The per-process directories.
struct Share {
    parent: PathBuf,
    root: PathBuf,
    sentinel: PathBuf,
    /// The sentinel as it was made.
    sentinel_snapshot: Snapshot,
    parent_snapshot: (Vec<std::ffi::OsString>, u32, u32, u32),
}

fn share() -> &'static Share {
    static SHARE: OnceLock<Share> = OnceLock::new();
    SHARE.get_or_init(|| {
        limit_file_size();
        log_everything();
        let parent = crate::process_dir("fuzz-fs");
        let root = parent.join("root");
        let sentinel = parent.join("sentinel");
        std::fs::create_dir(&root).expect("mkdir root");
        std::fs::create_dir(&sentinel).expect("mkdir sentinel");
        std::fs::write(sentinel.join("secret"), b"the host's secret\n").expect("write secret");
        std::fs::set_permissions(
            sentinel.join("secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod secret");
        std::fs::create_dir(sentinel.join("dir")).expect("mkdir sentinel/dir");
        std::fs::write(sentinel.join("dir/inner"), b"inner\n").expect("write inner");
        let sentinel_snapshot = snapshot(&sentinel);
        let parent_snapshot = parent_state(&parent);
        Share {
            parent,
            root,
            sentinel,
            sentinel_snapshot,
            parent_snapshot,
        }
    })
}

/// Formats every `log` record and drops it.
struct FormatAndDrop;

impl log::Log for FormatAndDrop {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let _ = std::fmt::format(*record.args());
    }
    fn flush(&self) {}
}

fn log_everything() {
    static LOGGER: FormatAndDrop = FormatAndDrop;
    // Another logger (a test harness's) serves as well: only the level
    // decides whether fuse-backend-rs's trace arguments are evaluated.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
}

/// Caps file size and turns SIGXFSZ into EFBIG for the guest.
fn limit_file_size() {
    let limit = libc::rlimit {
        rlim_cur: FILE_SIZE_LIMIT,
        rlim_max: FILE_SIZE_LIMIT,
    };
    // SAFETY: plain system calls on this process; the results are checked.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "setrlimit");
        assert_ne!(
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN),
            libc::SIG_ERR,
            "signal(SIGXFSZ)"
        );
    }
}

/// What is checked of each entry of the sentinel.
#[derive(Debug, PartialEq, Eq)]
struct EntryState {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    contents: Vec<u8>,
    xattrs: Vec<u8>,
}

type Snapshot = BTreeMap<PathBuf, EntryState>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    walk(dir, Path::new(""), &mut |relative, path, meta| {
        let contents = if meta.file_type().is_file() {
            std::fs::read(path).unwrap_or_else(|e| format!("unreadable: {e}").into_bytes())
        } else if meta.file_type().is_symlink() {
            std::fs::read_link(path)
                .map(|target| target.as_os_str().as_bytes().to_vec())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        out.insert(
            relative.to_owned(),
            EntryState {
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: meta.size(),
                nlink: meta.nlink(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
                contents,
                xattrs: xattrs(path),
            },
        );
    });
    out
}

/// Visits `dir` and everything below it without following symlinks.
fn walk(dir: &Path, relative: &Path, visit: &mut dyn FnMut(&Path, &Path, &std::fs::Metadata)) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    visit(relative, dir, &meta);
    if !meta.file_type().is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        walk(&dir.join(&name), &relative.join(&name), visit);
    }
}

/// Every extended attribute of `path` (not following a symlink), names
/// and values, in one byte string.
fn xattrs(path: &Path) -> Vec<u8> {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: the buffer is writable for its length; the path is a C string.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len <= 0 {
        return Vec::new();
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        out.extend_from_slice(name);
        out.push(b'=');
        let Ok(c_name) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len > 0 {
            out.extend_from_slice(&value[..len as usize]);
        }
        out.push(0);
    }
    out
}

/// The names in the share's directory, and its own mode and owner.
fn parent_state(parent: &Path) -> (Vec<std::ffi::OsString>, u32, u32, u32) {
    let mut names: Vec<_> = std::fs::read_dir(parent)
        .expect("read the share's directory")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let meta = std::fs::symlink_metadata(parent).expect("stat the share's directory");
    (names, meta.mode(), meta.uid(), meta.gid())
}

/// Empties the share (whatever the guest did to its modes) and lays out
/// the files every input starts from.
fn reset_root(share: &Share) {
    let root = &share.root;
    walk(root, Path::new(""), &mut |_, path, meta| {
        if meta.file_type().is_dir() {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        }
    });
    if let Err(error) = std::fs::remove_dir_all(root) {
        panic!("cannot empty the share {}: {error}", root.display());
    }
    std::fs::create_dir(root).expect("mkdir root");
    std::fs::write(root.join("hello.txt"), b"hello, guest\n").expect("write hello.txt");
    std::fs::create_dir(root.join("dir")).expect("mkdir dir");
    std::fs::write(root.join("dir/nested"), b"nested\n").expect("write dir/nested");
    std::fs::create_dir(root.join("empty")).expect("mkdir empty");
    std::os::unix::fs::symlink("../sentinel", root.join("up")).expect("symlink up");
    std::os::unix::fs::symlink("../sentinel/secret", root.join("secret")).expect("symlink secret");
    std::os::unix::fs::symlink(share.sentinel.join("secret"), root.join("abs"))
        .expect("symlink abs");
}

/// Checks that nothing outside the share changed and that the share
/// holds no device node.
fn check_confinement(share: &Share) {
    let parent = parent_state(&share.parent);
    assert_eq!(
        parent, share.parent_snapshot,
        "the directory holding the share changed"
    );
    let now = snapshot(&share.sentinel);
    if now != share.sentinel_snapshot {
        for (path, before) in &share.sentinel_snapshot {
            match now.get(path) {
                Some(after) if after == before => {}
                other => panic!(
                    "the guest changed {} outside the share: {before:?} -> {other:?}",
                    share.sentinel.join(path).display()
                ),
            }
        }
        panic!(
            "the guest created files outside the share: {:?}",
            now.keys()
                .filter(|p| !share.sentinel_snapshot.contains_key(*p))
                .collect::<Vec<_>>()
        );
    }
    walk(&share.root, Path::new(""), &mut |relative, _, meta| {
        let kind = meta.mode() & libc::S_IFMT;
        let device = kind == libc::S_IFBLK || (kind == libc::S_IFCHR && meta.rdev() != 0);
        assert!(
            !device,
            "the guest made a device node {} ({:o}, rdev {:#x}) in the share",
            relative.display(),
            meta.mode(),
            meta.rdev()
        );
    });
}

/// One input's device and guest.
struct Session {
    model: FsDeviceModel,
    mem: GuestMemoryMmap,
    driver: DriverQueue,
    queue: virtio_queue::Queue,
    unique: u64,
    nodes: Vec<u64>,
    handles: Vec<u64>,
}

impl Session {
    fn new(cache: CachePolicy, xattr: bool) -> Self {
        let mut config = FsConfig::new(&share().root);
        config.cache = cache;
        config.xattr = if xattr {
            husk_devices::fs::XattrPolicy::Mapped
        } else {
            husk_devices::fs::XattrPolicy::Off
        };
        config.queue_size = QUEUE_SIZE;
        let model = FsDeviceModel::new(&config).expect("cannot create the virtio-fs model");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("cannot allocate guest memory");
        let driver = DriverQueue::new(&mem, 0x1000, QUEUE_SIZE, BUF_STRIDE);
        assert!(driver.end() <= MEM_SIZE as u64);
        let queue = driver.device_queue();
        Self {
            model,
            mem,
            driver,
            queue,
            unique: 0,
            nodes: Vec::new(),
            handles: Vec::new(),
        }
    }

    /// Sends one request (already split into readable parts) with a reply
    /// buffer of `reply_size` bytes; returns the reply, if any.
    fn request(&mut self, parts: &[&[u8]], reply_size: u32) -> Option<Vec<u8>> {
        let mut chain: Vec<(u32, bool, &[u8])> =
            parts.iter().map(|p| (p.len() as u32, false, *p)).collect();
        if reply_size > 0 {
            chain.push((reply_size, true, &[]));
        }
        self.driver
            .add_chain(&self.mem, &chain)
            .expect("the request ring is full");
        self.model
            .process_queue(&self.mem, &mut self.queue)
            .expect("the device failed on a well-formed ring");
        let (_, len, data) = self
            .driver
            .pop_used(&self.mem)
            .expect("the device did not return the request");
        assert!(
            len <= reply_size,
            "reply of {len} bytes in a {reply_size}-byte buffer"
        );
        (len > 0).then_some(data)
    }

    fn next_unique(&mut self) -> u64 {
        self.unique += 2;
        self.unique
    }
}

fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(IN_HEADER_LEN);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&opcode.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(&nodeid.to_le_bytes());
    out.extend_from_slice(&uid.to_le_bytes());
    out.extend_from_slice(&gid.to_le_bytes());
    out.extend_from_slice(&4242u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// Checks a reply's header against its request; returns the errno
/// (0 for success).
fn check_reply(reply: &[u8], unique: u64, opcode: u32) -> i32 {
    assert!(
        reply.len() >= OUT_HEADER_LEN,
        "a {}-byte reply to opcode {opcode}",
        reply.len()
    );
    let len = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
    let error = i32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&reply[8..16]);
    let reply_unique = u64::from_le_bytes(raw);
    assert_eq!(
        len as usize,
        reply.len(),
        "the reply header's length disagrees with the used length (opcode {opcode})"
    );
    assert_eq!(reply_unique, unique, "a reply to another request");
    assert!(
        (-4095..=0).contains(&error),
        "errno {error} out of range (opcode {opcode})"
    );
    if error != 0 {
        assert_eq!(len as usize, OUT_HEADER_LEN, "an error reply with a body");
    }
    error
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let raw: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(raw))
}

/// Runs one input.
pub fn fuse_requests(data: &[u8]) {
    let share = share();
    reset_root(share);
    let fds_before = open_fds();
    let mut input = Input::new(data);
    let setup = input.u8();
    let cache = [
        CachePolicy::Auto,
        CachePolicy::Never,
        CachePolicy::Metadata,
        CachePolicy::Always,
    ][usize::from(setup & 3)];
    let mut session = Session::new(cache, setup & 4 == 0);
    if setup & 8 == 0 {
        init(&mut session, input.u32());
    }
    for _ in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        one_request(&mut session, &mut input);
    }
    drop(session);
    let fds_after = open_fds();
    assert_eq!(
        fds_after, fds_before,
        "file descriptors outlived the virtio-fs model"
    );
    check_confinement(share);
}

/// What a Linux guest sends first.
fn init(session: &mut Session, flags: u32) {
    let unique = session.next_unique();
    let mut request = in_header((IN_HEADER_LEN + 16) as u32, opcode::INIT, unique, 0, 0, 0);
    request.extend_from_slice(&7u32.to_le_bytes());
    request.extend_from_slice(&31u32.to_le_bytes());
    request.extend_from_slice(&(128u32 * 1024).to_le_bytes());
    request.extend_from_slice(&flags.to_le_bytes());
    if let Some(reply) = session.request(&[&request], 4096) {
        check_reply(&reply, unique, opcode::INIT);
    }
}

fn pick(values: &[u64], input: &mut Input) -> u64 {
    let index = usize::from(input.u8());
    if values.is_empty() {
        ROOT_ID
    } else {
        values[index % values.len()]
    }
}

fn one_request(session: &mut Session, input: &mut Input) {
    let selector = input.u8();
    let opcode = if usize::from(selector) < opcode::ALL.len() * 4 {
        opcode::ALL[usize::from(selector) % opcode::ALL.len()]
    } else {
        input.u32()
    };
    let flags = input.u8();
    let nodeid = match flags & 3 {
        0 => ROOT_ID,
        1 | 2 => pick(&session.nodes, input),
        _ => input.u64(),
    };
    // The argument struct, then names, then a data tail.
    let struct_len = usize::from(input.u8() % 96);
    let mut body = input.bytes(struct_len).to_vec();
    body.resize(struct_len, 0);
    for _ in 0..(input.u8() % 3) {
        if body.len() < 8 {
            break;
        }
        let slots = body.len() / 8;
        let at = usize::from(input.u8()) % slots * 8;
        let value = if input.u8() & 1 == 0 {
            pick(&session.handles, input)
        } else {
            pick(&session.nodes, input)
        };
        body[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    for _ in 0..(input.u8() % 3) {
        let choice = input.u8();
        if usize::from(choice) < NAMES.len() * 8 {
            body.extend_from_slice(NAMES[usize::from(choice) % NAMES.len()]);
        } else {
            let len = usize::from(input.u8() % 64);
            body.extend_from_slice(input.bytes(len));
        }
        body.push(0);
    }
    let tail_len = TAIL_SIZES[usize::from(input.u8()) % TAIL_SIZES.len()];
    let tail_start = body.len();
    body.extend_from_slice(input.bytes(tail_len.min(256)));
    body.resize(tail_start + tail_len, 0);

    let (uid, gid) = if flags & 0x80 != 0 {
        (input.u32(), input.u32())
    } else {
        (0, 0)
    };
    let len = if flags & 4 != 0 {
        input.u32()
    } else {
        (IN_HEADER_LEN + body.len()) as u32
    };
    let unique = session.next_unique();
    let mut wire = in_header(len, opcode, unique, nodeid, uid, gid);
    wire.extend_from_slice(&body);
    let reply_size = REPLY_SIZES[usize::from(flags >> 5 & 3)];
    let parts: Vec<&[u8]> = match (flags >> 3) & 3 {
        0 => vec![&wire],
        1 => vec![&wire[..IN_HEADER_LEN], &wire[IN_HEADER_LEN..]],
        2 => {
            let cut = usize::from(input.u16()) % (wire.len() + 1);
            vec![&wire[..cut], &wire[cut..]]
        }
        _ => {
            let a = usize::from(input.u16()) % (wire.len() + 1);
            let b = usize::from(input.u16()) % (wire.len() + 1);
            let (a, b) = (a.min(b), a.max(b));
            vec![&wire[..a], &wire[a..b], &wire[b..]]
        }
    };
    let parts: Vec<&[u8]> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    let Some(reply) = session.request(&parts, reply_size) else {
        return;
    };
    assert!(
        opcode != opcode::FORGET && opcode != opcode::BATCH_FORGET,
        "FORGET got a reply"
    );
    if check_reply(&reply, unique, opcode) != 0 {
        return;
    }
    let remember = |values: &mut Vec<u64>, value: Option<u64>| {
        if let Some(value) = value {
            if !values.contains(&value) && values.len() < 32 {
                values.push(value);
            }
        }
    };
    match opcode {
        opcode::LOOKUP | opcode::MKNOD | opcode::MKDIR | opcode::SYMLINK | opcode::LINK => {
            remember(&mut session.nodes, u64_at(&reply, OUT_HEADER_LEN));
        }
        opcode::CREATE => {
            remember(&mut session.nodes, u64_at(&reply, OUT_HEADER_LEN));
            remember(
                &mut session.handles,
                u64_at(&reply, OUT_HEADER_LEN + ENTRY_OUT_LEN),
            );
        }
        opcode::OPEN | opcode::OPENDIR => {
            remember(&mut session.handles, u64_at(&reply, OUT_HEADER_LEN));
        }
        _ => {}
    }
}
