//! The file system the guest talks to: fuse-backend-rs's passthrough file
//! system, plus the policies the protocol layer leaves to us.
//!
//! fuse-backend-rs's `Server` enables only the INIT flags the file system
//! asks for, and the passthrough asks for none of the transfer-size and
//! concurrency flags, which would hold every READ and WRITE to 4 KiB and
//! serialise directory operations. [`SharedFs::init`] adds the flags the
//! server and the passthrough implement (1 MiB requests through
//! `MAX_PAGES`, asynchronous and parallel requests), and never grants the
//! ones that would let the guest attach security metadata to new host
//! files ([`REFUSED_INIT_FLAGS`]).
//!
//! It refuses to create block and character device nodes other than
//! overlayfs whiteouts (0/0): the guest's root must not leave a node on the
//! host that opens a host device for whoever opens it there. Under
//! [`XattrPolicy::Mapped`] it renames extended attributes on their way to
//! the host so that the guest's `security.*`, `trusted.*` and `system.*`
//! never become the host file's (see `super::xattr`). It counts the inodes
//! and handles the guest holds and refuses, with `ENFILE`, those beyond the
//! share's limits (see `super::limits`). Every other request is passed
//! through unchanged, except that a repeated INIT (a guest that rebooted
//! while a vhost-user backend stayed up) first forgets the old session.

use std::borrow::Cow;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::config::{FsConfig, XattrPolicy};
use super::limits::{limit_reached, HandleLedger, InodeLedger};
use super::xattr::{self, HostName, XATTR_LIST_MAX};
use crate::guest_log::{guest_warn, GuestBytes, GuestLog};

/// INIT flags the protocol layer supports whatever the file system: large
/// requests (`BIG_WRITES`, `MAX_PAGES`: fuse-backend-rs then offers 256
/// pages, 1 MiB), concurrent reads and directory operations (the
/// passthrough is internally synchronised), `O_TRUNC` carried by OPEN,
/// asynchronous direct I/O, and page-cache invalidation on mtime change.
pub const BASELINE_INIT_FLAGS: FsOptions = FsOptions::ASYNC_READ
    .union(FsOptions::BIG_WRITES)
    .union(FsOptions::MAX_PAGES)
    .union(FsOptions::PARALLEL_DIROPS)
    .union(FsOptions::ATOMIC_O_TRUNC)
    .union(FsOptions::ASYNC_DIO)
    .union(FsOptions::AUTO_INVAL_DATA);

/// INIT flags never granted, whoever asks. `POSIX_ACL` would make the
/// guest kernel hand ACLs to the server as ACLs and expect them enforced
/// and inherited on the host; without it they are plain `system.*` xattrs,
/// which the xattr policy keeps off the host file.
///
/// The other way for a guest to label host files, `FUSE_SECURITY_CTX`
/// (bit 32, 7.36: a security context appended to CREATE, MKDIR, MKNOD and
/// SYMLINK), has no [`FsOptions`] flag in fuse-backend-rs 0.14: the server
/// drops it from the kernel's offer (`from_bits_truncate`) and never
/// grants it, so the kernel never sends one. A unit test pins that down, so
/// an upgrade that learns the flag has to come here.
pub const REFUSED_INIT_FLAGS: FsOptions = FsOptions::POSIX_ACL;

/// The passthrough file system as the guest sees it.
pub struct SharedFs {
    inner: PassthroughFs,
    /// Set by the first INIT; a later INIT is a new guest session.
    initialized: AtomicBool,
    xattr: XattrPolicy,
    /// Whether the guest may set setuid/setgid bits on host files.
    allow_setuid: bool,
    inodes: InodeLedger,
    handles: HandleLedger,
    /// Where refusals at the limits are reported.
    guest_log: GuestLog,
    /// The flags each open file handle was opened with. READ and WRITE
    /// pass these to the passthrough instead of the flags the guest sends:
    /// fuse-backend-rs 0.14 re-applies differing flags with `F_SETFL`, and
    /// when that fails (clearing `O_APPEND` on an append-only file, say) it
    /// closes the handle's fd while the handle still names that fd number,
    /// so the next fd the shim opens would be reachable through it.
    open_flags: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
}

impl SharedFs {
    /// `inner` with the policies and limits of `config`; refusals at the
    /// limits are logged on `guest_log`.
    pub fn new(inner: PassthroughFs, config: &FsConfig, guest_log: GuestLog) -> Self {
        Self {
            inner,
            initialized: AtomicBool::new(false),
            xattr: config.xattr,
            allow_setuid: config.allow_setuid,
            inodes: InodeLedger::new(config.max_open_inodes),
            handles: HandleLedger::new(config.max_open_handles),
            guest_log,
            open_flags: Default::default(),
        }
    }

    fn lock_open_flags(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u32>> {
        self.open_flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_open_flags(&self, handle: u64, flags: u32) {
        self.lock_open_flags().insert(handle, flags);
    }

    /// The flags `handle` was opened with (the guest's `flags` for a
    /// handle this layer did not open, which the passthrough refuses).
    fn flags_of(&self, handle: u64, guest_flags: u32) -> u32 {
        self.lock_open_flags()
            .get(&handle)
            .copied()
            .unwrap_or(guest_flags)
    }

    /// Inodes the guest holds now.
    pub fn open_inodes(&self) -> usize {
        self.inodes.live()
    }

    /// Files and directories the guest has open now.
    pub fn open_handles(&self) -> usize {
        self.handles.live()
    }

    /// Counts the lookup `entry` gives the guest, or, when it names a new
    /// inode and the share is full, forgets it again and refuses.
    fn admit_entry(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if self.inodes.add_lookup(entry.inode) {
            return Ok(entry);
        }
        self.inner.forget(ctx, entry.inode, 1);
        Err(self.inode_limit_reached())
    }

    fn inode_limit_reached(&self) -> io::Error {
        guest_warn!(
            self.guest_log,
            held = self.inodes.live(),
            "virtio-fs: the guest holds max_open_inodes inodes; refusing a new one with ENFILE"
        );
        limit_reached()
    }

    fn handle_limit_reached(&self) -> io::Error {
        guest_warn!(
            self.guest_log,
            held = self.handles.live(),
            "virtio-fs: the guest holds max_open_handles open files; refusing another with ENFILE"
        );
        limit_reached()
    }

    /// Forgets everything the guest held: a new session, or DESTROY.
    fn forget_session(&self) {
        self.inodes.clear();
        self.handles.clear();
    }

    /// The host name for the guest's xattr `name`, or the errno that
    /// refuses it. With xattrs off the passthrough refuses every name.
    fn host_xattr_name<'a>(&self, name: &'a CStr) -> io::Result<Cow<'a, CStr>> {
        if self.xattr == XattrPolicy::Off {
            return Ok(Cow::Borrowed(name));
        }
        match xattr::host_name(name) {
            HostName::Same => Ok(Cow::Borrowed(name)),
            HostName::Stored(host) => Ok(Cow::Owned(host)),
            HostName::Reserved => {
                tracing::debug!(
                    name = %GuestBytes(name.to_bytes()),
                    "virtio-fs: refusing an xattr name reserved for husk"
                );
                Err(io::Error::from_raw_os_error(libc::EPERM))
            }
            HostName::Unsupported => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }
}

/// Whether MKNOD may create a node of `mode`/`rdev` in the share: anything
/// but a device node, except the 0/0 character device overlayfs uses as a
/// whiteout.
/// `mode` without the bits that would make a host file run with its
/// owner's or group's privileges: setuid always, setgid except on a
/// directory (where it only makes new entries inherit the group). The
/// guest's root is not the host's: a setuid-root program it writes into a
/// rootfs or volume must not be one on the host.
pub fn without_privilege_bits(mode: u32, is_directory: bool) -> u32 {
    let mut mode = mode & !libc::S_ISUID;
    if !is_directory {
        mode &= !libc::S_ISGID;
    }
    mode
}

fn is_directory_mode(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

pub fn mknod_allowed(mode: u32, rdev: u32) -> bool {
    match mode & libc::S_IFMT {
        libc::S_IFBLK => false,
        libc::S_IFCHR => rdev == 0,
        _ => true,
    }
}

impl FileSystem for SharedFs {
    type Inode = <PassthroughFs as FileSystem>::Inode;
    type Handle = <PassthroughFs as FileSystem>::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // A second INIT without DESTROY means the guest rebooted with the
        // device still attached (vhost-user keeps the backend): drop the
        // old session's inodes and handles, and their host fds, first.
        if self.initialized.swap(true, Ordering::SeqCst) {
            self.inner.destroy();
        }
        self.forget_session();
        let wanted = self.inner.init(capable)?;
        Ok((wanted | (capable & BASELINE_INIT_FLAGS)) - REFUSED_INIT_FLAGS)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if !mknod_allowed(mode, rdev) {
            tracing::debug!(
                mode,
                rdev,
                "virtio-fs: refusing to create a device node in the share"
            );
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let slot = self
            .inodes
            .reserve()
            .map_err(|_| self.inode_limit_reached())?;
        let mode = if self.allow_setuid {
            mode
        } else {
            without_privilege_bits(mode, is_directory_mode(mode))
        };
        let entry = self.inner.mknod(ctx, inode, name, mode, rdev, umask)?;
        slot.commit(entry.inode);
        Ok(entry)
    }

    fn destroy(&self) {
        self.inner.destroy();
        self.forget_session();
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        #[cfg(feature = "test-hooks")]
        if let Some(error) = super::test_hooks::on_lookup(name) {
            return Err(error);
        }
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit_entry(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.inodes.forget(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        for (inode, count) in &requests {
            self.inodes.forget(*inode, *count);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let slot = self
            .handles
            .reserve()
            .map_err(|_| self.handle_limit_reached())?;
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        slot.commit(opened.0);
        if let Some(handle) = opened.0 {
            self.record_open_flags(handle, flags);
        }
        Ok(opened)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let slot = self
            .handles
            .reserve()
            .map_err(|_| self.handle_limit_reached())?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        slot.commit(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        // Both slots first, so a full share refuses before creating a file.
        let inode_slot = self
            .inodes
            .reserve()
            .map_err(|_| self.inode_limit_reached())?;
        let handle_slot = self
            .handles
            .reserve()
            .map_err(|_| self.handle_limit_reached())?;
        let mut args = args;
        if !self.allow_setuid {
            args.mode = without_privilege_bits(args.mode, false);
        }
        let created = self.inner.create(ctx, parent, name, args)?;
        inode_slot.commit(created.0.inode);
        handle_slot.commit(created.1);
        if let Some(handle) = created.1 {
            self.record_open_flags(handle, args.flags);
        }
        Ok(created)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.handles.release(handle);
        self.lock_open_flags().remove(&handle);
        Ok(())
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.handles.release(handle);
        Ok(())
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        let slot = self
            .inodes
            .reserve()
            .map_err(|_| self.inode_limit_reached())?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        slot.commit(entry.inode);
        Ok(entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let slot = self
            .inodes
            .reserve()
            .map_err(|_| self.inode_limit_reached())?;
        let mode = if self.allow_setuid {
            mode
        } else {
            without_privilege_bits(mode, true)
        };
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        slot.commit(entry.inode);
        Ok(entry)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        // The guest names an inode it holds, so this is one more lookup of
        // a counted inode; only a forged node id can be refused here (after
        // the link exists on the host).
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit_entry(ctx, entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry the reply carries is a lookup. One that would exceed
        // the limit is sent without its inode (node id 0: the kernel lists
        // the name and looks it up when used, which is then refused), and
        // the passthrough's reference is dropped once the listing is done.
        let mut delivered = Vec::new();
        let mut unsent = Vec::new();
        let result =
            self.inner
                .readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
                    let counted = self.inodes.add_lookup(entry.inode);
                    let sent = if counted {
                        entry
                    } else {
                        Entry {
                            inode: 0,
                            generation: 0,
                            attr_timeout: Duration::ZERO,
                            entry_timeout: Duration::ZERO,
                            ..entry
                        }
                    };
                    let written = add_entry(dir_entry, sent);
                    match (&written, counted) {
                        // No room: the passthrough forgets its reference itself.
                        (Ok(0), true) => self.inodes.forget(entry.inode, 1),
                        (Ok(0), false) => {}
                        (Ok(_), true) => delivered.push(entry.inode),
                        (Ok(_), false) => unsent.push(entry.inode),
                        // The passthrough keeps its reference when adding fails.
                        (Err(_), true) => {
                            self.inodes.forget(entry.inode, 1);
                            unsent.push(entry.inode);
                        }
                        (Err(_), false) => unsent.push(entry.inode),
                    }
                    written
                });
        if result.is_err() {
            // An error reply carries no entry: none of them is the guest's.
            for delivered in delivered {
                self.inodes.forget(delivered, 1);
                unsent.push(delivered);
            }
        }
        for inode in unsent {
            self.inner.forget(ctx, inode, 1);
        }
        result
    }

    // Everything below passes straight through.

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let mut attr = attr;
        let privileged = libc::S_ISUID | libc::S_ISGID;
        if !self.allow_setuid
            && valid.contains(SetattrValid::MODE)
            && attr.st_mode & privileged != 0
        {
            let (current, _) = self.inner.getattr(ctx, inode, None)?;
            attr.st_mode = without_privilege_bits(attr.st_mode, is_directory_mode(current.st_mode));
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let flags = self.flags_of(handle, flags);
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let flags = self.flags_of(handle, flags);
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let host = self.host_xattr_name(name)?;
        self.inner.setxattr(ctx, inode, &host, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let host = self.host_xattr_name(name)?;
        self.inner.getxattr(ctx, inode, &host, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        if self.xattr == XattrPolicy::Off {
            return self.inner.listxattr(ctx, inode, size);
        }
        // The guest's list is shorter than the host's and its length is not
        // known before filtering: fetch the whole host list (never longer
        // than XATTR_LIST_MAX), filter, then answer the size probe (size 0)
        // or the real request (ERANGE when the guest's buffer is short).
        let host_list = match self.inner.listxattr(ctx, inode, XATTR_LIST_MAX)? {
            ListxattrReply::Names(names) => names,
            ListxattrReply::Count(_) => return Err(io::Error::from_raw_os_error(libc::EIO)),
        };
        let list = xattr::guest_list(&host_list);
        let len =
            u32::try_from(list.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        if size == 0 {
            Ok(ListxattrReply::Count(len))
        } else if len > size {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(list))
        }
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        let host = self.host_xattr_name(name)?;
        self.inner.removexattr(ctx, inode, &host)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FUSE_SECURITY_CTX` (include/uapi/linux/fuse.h, 7.36): bit 32.
    const FUSE_SECURITY_CTX: u64 = 1 << 32;
    /// `FUSE_CREATE_SUPP_GROUP` (7.38): bit 34, the other create extension.
    const FUSE_CREATE_SUPP_GROUP: u64 = 1 << 34;

    #[test]
    fn fuse_backend_rs_knows_no_flag_that_would_carry_a_guest_security_context() {
        // If this fails, fuse-backend-rs learnt the flag: the server would
        // then grant it whenever the file system asks, and create requests
        // would carry guest-chosen labels. Refuse it in REFUSED_INIT_FLAGS
        // (or parse and drop the context) before upgrading.
        let offered = FsOptions::from_bits_truncate(FUSE_SECURITY_CTX | FUSE_CREATE_SUPP_GROUP);
        assert!(offered.is_empty(), "{offered:?}");
    }

    #[test]
    fn refused_init_flags_are_not_in_the_baseline() {
        assert!(!BASELINE_INIT_FLAGS.intersects(REFUSED_INIT_FLAGS));
        assert!(REFUSED_INIT_FLAGS.contains(FsOptions::POSIX_ACL));
    }
}
