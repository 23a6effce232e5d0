//! Who QEMU runs as. By default every QEMU runs as an unprivileged user of
//! its own: a uid (and the gid of the same number) taken from a configured
//! range, no supplementary groups but the one that opens `/dev/kvm` when
//! the guest runs under KVM, and no capabilities. [`RunAs::Root`] keeps
//! QEMU as root, for debugging.
//!
//! QEMU needs no path in the pod's 0700 VM directory: its sockets reach it
//! as inherited fds (see `command.rs`). What it still opens by path, the
//! guest kernel, the initramfs and `/dev/kvm`, is opened here first under
//! QEMU's identity ([`QemuIdentity::check_access`]), so a file the uid
//! cannot read fails the start naming that file, not deep in QEMU's output.
//!
//! **One uid per running QEMU.** Two QEMUs sharing a uid could signal each
//! other and read each other's guest memory through `/proc/<pid>/mem`, so
//! a uid is never shared while its QEMU lives. [`UidLease::take`] starts at
//! an index derived from the VM directory (the same pod asks for the same
//! uid first) and walks the range until it finds a uid that
//! 1. no other husk shim holds: the holder keeps an exclusive `flock` on
//!    `<uid>.lock` in a root-only directory ([`lease_directory`]) while its
//!    QEMU runs; the kernel drops the lock when the holder's fd closes,
//!    even when the shim is killed, and a holder that ends normally
//!    removes the file while it still holds the lock (a taker checks that
//!    the file it locked is still the one at the path); and
//! 2. no process on the host runs as (uid or gid, real, effective, saved or
//!    file system): a QEMU whose shim just died may still be exiting after
//!    its lease was freed, and an operator's process may have strayed into
//!    the range. The scan follows the lease, so a process it does not see
//!    was gone before the lease was taken.
//!
//! Only root can create or lock files in that directory, so no local
//! user can hold uids and stop pods from starting (an abstract socket
//! name, which any user can bind, could). A range whose every uid is held
//! or in use fails the start naming the setting that sizes it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::QemuError;

/// The first id of the default range: 0x70000000, the start of the block
/// systemd's `UIDS-GIDS.md` leaves unused between container ranges
/// (0x00080000–0x6FFFFFFF) and the ids above 2^31 that signed 32-bit code
/// misreads.
pub const DEFAULT_QEMU_ID_FIRST: u32 = 0x7000_0000;
/// The default number of ids: as many as one 16-bit user namespace range,
/// far above the pods a node runs at once.
pub const DEFAULT_QEMU_ID_COUNT: u32 = 65_536;

/// The overflow ids the kernel shows for unmapped users (`nobody`,
/// 65534) and the 16-bit `-1` (65535): a range may not include them.
const OVERFLOW_IDS: [u32; 2] = [65_534, 65_535];

/// Where the lease files live: `qemu-ids` beside the sandboxes' run root
/// (`/run/husk/qemu-ids`), created 0700.
pub fn lease_directory() -> PathBuf {
    let run_root = crate::paths::run_root();
    run_root.parent().unwrap_or(&run_root).join("qemu-ids")
}

/// A range of ids: `first` to `first + count - 1`, uids and gids alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    first: u32,
    count: u32,
}

impl IdRange {
    /// The default range, [`DEFAULT_QEMU_ID_FIRST`] and
    /// [`DEFAULT_QEMU_ID_COUNT`] ids on.
    pub const DEFAULT: IdRange = IdRange {
        first: DEFAULT_QEMU_ID_FIRST,
        count: DEFAULT_QEMU_ID_COUNT,
    };

    /// `count` ids from `first`; refuses root, an empty range, one that
    /// passes the largest valid id (`u32::MAX - 1`; `u32::MAX` is the
    /// kernel's "no id") and one that holds an overflow id. The reason
    /// names the offending number.
    pub fn new(first: u32, count: u32) -> Result<Self, String> {
        if first == 0 {
            return Err("0 is root; an unprivileged range starts at 1 or above".to_owned());
        }
        if count == 0 {
            return Err("the range holds no id (count 0)".to_owned());
        }
        let last = u64::from(first) + u64::from(count) - 1;
        if last > u64::from(u32::MAX - 1) {
            return Err(format!(
                "the range ends at {last}, above the largest id {}",
                u32::MAX - 1
            ));
        }
        if let Some(overflow) = OVERFLOW_IDS
            .iter()
            .find(|&&id| id >= first && u64::from(id) <= last)
        {
            return Err(format!(
                "the range {first}..={last} holds {overflow}, the kernel's overflow id (nobody)"
            ));
        }
        Ok(Self { first, count })
    }

    pub fn first(&self) -> u32 {
        self.first
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The id at `index` (taken modulo the range's size).
    fn id_at(&self, index: u64) -> u32 {
        self.first + (index % u64::from(self.count)) as u32
    }
}

/// Who QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// A uid of its own (gid of the same number) from the range.
    Unprivileged(IdRange),
    /// Root, as the shim: for debugging only.
    Root,
}

impl Default for RunAs {
    fn default() -> Self {
        RunAs::Unprivileged(IdRange::DEFAULT)
    }
}

/// The credentials QEMU is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuIdentity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: empty, or `/dev/kvm`'s group under KVM.
    pub groups: Vec<u32>,
}

impl QemuIdentity {
    /// Adds `/dev/kvm`'s group when the device is not open to everyone,
    /// so QEMU can open it for `-accel kvm`; refuses a device whose group
    /// cannot read and write it (only root could then).
    pub fn allow_kvm(&mut self, device: &Path, setting: &'static str) -> Result<(), QemuError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(device).map_err(|source| QemuError::NotAccessible {
            what: "KVM device",
            path: device.to_path_buf(),
            identity: self.to_string(),
            setting,
            source,
        })?;
        let mode = meta.mode();
        if mode & 0o006 == 0o006 || meta.uid() == self.uid {
            return Ok(());
        }
        if mode & 0o060 == 0o060 {
            if meta.gid() != self.gid && !self.groups.contains(&meta.gid()) {
                self.groups.push(meta.gid());
            }
            return Ok(());
        }
        Err(QemuError::NotAccessible {
            what: "KVM device",
            path: device.to_path_buf(),
            identity: self.to_string(),
            setting,
            source: std::io::Error::other(format!(
                "mode {:04o}, owner {}:{}: only its owner can open it; give it a group with \
                 read and write (Debian's is kvm, mode 0660)",
                mode & 0o7777,
                meta.uid(),
                meta.gid()
            )),
        })
    }

    /// Opens `path` (read-only, or read-write) as QEMU will: on a
    /// short-lived thread whose file system ids and groups are QEMU's, so
    /// the kernel applies the very checks QEMU meets (modes, ACLs, every
    /// directory above). `setting` names where the path came from.
    pub fn check_access(
        &self,
        what: &'static str,
        path: &Path,
        read_write: bool,
        setting: &'static str,
    ) -> Result<(), QemuError> {
        let identity = self.clone();
        let target = path.to_path_buf();
        let outcome = std::thread::Builder::new()
            .name("husk-qemu-access".into())
            .spawn(move || open_as(&identity, &target, read_write))
            .map_err(|source| QemuError::NotAccessible {
                what,
                path: path.to_path_buf(),
                identity: self.to_string(),
                setting,
                source,
            })?
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the access check panicked")));
        outcome.map_err(|source| QemuError::NotAccessible {
            what,
            path: path.to_path_buf(),
            identity: self.to_string(),
            setting,
            source,
        })
    }
}

impl std::fmt::Display for QemuIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if !self.groups.is_empty() {
            write!(f, " groups {:?}", self.groups)?;
        }
        Ok(())
    }
}

/// Runs on its own thread, which ends right after: takes `identity` as the
/// thread's file system ids and groups (raw system calls change the
/// calling thread only) and opens `path`.
fn open_as(identity: &QemuIdentity, path: &Path, read_write: bool) -> std::io::Result<()> {
    let groups: Vec<libc::gid_t> = identity.groups.clone();
    // SAFETY: setgroups(2) reads `groups.len()` ids from a live vector.
    if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: setfsgid(2)/setfsuid(2) take an id and return the previous
    // one; they cannot fail in a way that hurts memory safety.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, identity.gid);
        libc::syscall(libc::SYS_setfsuid, identity.uid);
    }
    // setfs*id report no error: -1 changes nothing and returns the ids in
    // force, which must now be QEMU's.
    // SAFETY: as above.
    let (fsuid, fsgid) = unsafe {
        (
            libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
            libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
        )
    };
    if (fsuid, fsgid) != (identity.uid, identity.gid) {
        return Err(std::io::Error::other(format!(
            "cannot take QEMU's file system ids for the check (still uid {fsuid} gid {fsgid})"
        )));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(read_write)
        .open(path)
        .map(drop)
}

/// A uid held for one QEMU: while the lease lives no other husk shim
/// takes it. Dropping it frees the uid; drop it only once QEMU is reaped.
#[derive(Debug)]
pub struct UidLease {
    identity: QemuIdentity,
    _holder: LeaseFile,
}

/// `<uid>.lock`, locked; dropping it removes the file, then unlocks.
#[derive(Debug)]
struct LeaseFile {
    /// Holds the lock until it closes.
    _file: File,
    path: PathBuf,
}

impl Drop for LeaseFile {
    fn drop(&mut self) {
        // Removed while still locked: a shim that opened it meanwhile finds
        // it unlinked once it gets the lock, and starts over.
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::debug!(%error, path = %self.path.display(), "cannot remove a uid lease file");
        }
        // `_file` closes after this, which releases the lock.
    }
}

impl UidLease {
    /// Takes a free uid of `range` for the VM whose directory is `vm_dir`,
    /// holding it in `lease_dir` (see [`lease_directory`]); `setting` names
    /// the configuration that sizes the range.
    pub fn take(
        range: IdRange,
        vm_dir: &Path,
        lease_dir: &Path,
        setting: &'static str,
    ) -> Result<Self, QemuError> {
        prepare_lease_directory(lease_dir)?;
        let start = start_index(vm_dir);
        let mut in_use: Option<std::collections::BTreeSet<u32>> = None;
        let mut held = 0u32;
        for step in 0..u64::from(range.count()) {
            let id = range.id_at(start + step);
            let Some(holder) = lock_lease(lease_dir, id)? else {
                held += 1;
                continue;
            };
            // The scan runs once, after the first lease: any process it
            // misses had exited before that lease was taken.
            let in_use = in_use.get_or_insert_with(ids_in_use);
            if in_use.contains(&id) {
                continue;
            }
            return Ok(Self {
                identity: QemuIdentity {
                    uid: id,
                    gid: id,
                    groups: Vec::new(),
                },
                _holder: holder,
            });
        }
        Err(QemuError::NoFreeUid {
            first: range.first(),
            count: range.count(),
            held,
            setting,
        })
    }

    /// The credentials this lease gives QEMU.
    pub fn identity(&self) -> &QemuIdentity {
        &self.identity
    }
}

/// Where the walk through the range starts for `vm_dir`: the first 8
/// bytes of the SHA-256 of its path, so a pod asks for the same uid first
/// each time and pods spread over the range.
fn start_index(vm_dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let digest = Sha256::digest(vm_dir.as_os_str().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Creates the lease directory (0700) if needed and refuses one that is
/// not a directory of the shim's user closed to everyone else: whoever
/// could write there could hold every uid.
fn prepare_lease_directory(dir: &Path) -> Result<(), QemuError> {
    let failed = |source| QemuError::UidLease {
        name: dir.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(failed)?;
    let meta = std::fs::symlink_metadata(dir).map_err(failed)?;
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        return Err(failed(std::io::Error::other(format!(
            "it must be a directory of uid {euid} that no one else can write (it is {}, \
             owner {}, mode {:04o})",
            if meta.is_dir() {
                "a directory"
            } else {
                "not a directory"
            },
            meta.uid(),
            meta.mode() & 0o7777
        ))));
    }
    Ok(())
}

/// Removes the lease files in `dir` that nobody holds: a shim killed with
/// its QEMU leaves its file behind, unlocked. Each is locked before it is
/// removed, so a live lease is never touched. Returns how many went.
pub fn remove_stale_leases(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|name| name.strip_suffix(".lock"))
            .and_then(|id| id.parse::<u32>().ok())
        else {
            continue;
        };
        // Dropping the lease removes the file while it is locked.
        if let Ok(Some(lease)) = lock_lease(dir, id) {
            drop(lease);
            removed += 1;
        }
    }
    removed
}

/// Locks `<dir>/<id>.lock`: `Some` holds the uid, `None` means another
/// shim holds it.
fn lock_lease(dir: &Path, id: u32) -> Result<Option<LeaseFile>, QemuError> {
    let path = dir.join(format!("{id}.lock"));
    let failed = |source| QemuError::UidLease {
        name: path.display().to_string(),
        source,
    };
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(failed)?;
        // SAFETY: flock(2) on an fd this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(failed(error));
        }
        // The holder before us may have removed the file between our open
        // and our lock: then the lock is on a file no one else will find.
        let locked = file.metadata().map_err(failed)?;
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => {
                return Ok(Some(LeaseFile { _file: file, path }));
            }
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(failed(error)),
        }
    }
}

/// Every uid and gid (real, effective, saved, file system) of a process on
/// the host, read from `/proc/<pid>/status`. Processes that end while it
/// reads are skipped.
fn ids_in_use() -> std::collections::BTreeSet<u32> {
    let mut ids = std::collections::BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return ids;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let status_path: PathBuf = entry.path().join("status");
        let Ok(status) = std::fs::read_to_string(&status_path) else {
            continue;
        };
        ids.extend(status_ids(&status));
    }
    ids
}

/// The ids on the `Uid:` and `Gid:` lines of a `/proc/<pid>/status`.
fn status_ids(status: &str) -> impl Iterator<Item = u32> + '_ {
    status
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"))
        })
        .flat_map(str::split_whitespace)
        .filter_map(|id| id.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small range of its own per test, far from the default, so tests
    /// running at once and real pods never meet.
    fn test_range(first: u32, count: u32) -> IdRange {
        IdRange::new(first, count).unwrap()
    }

    #[test]
    fn ranges_with_root_overflow_ids_or_past_the_largest_id_are_refused() {
        assert!(IdRange::new(0, 10).unwrap_err().contains("root"));
        assert!(IdRange::new(1000, 0).unwrap_err().contains("count 0"));
        let error = IdRange::new(u32::MAX - 10, 11).unwrap_err();
        assert!(error.contains(&u64::from(u32::MAX).to_string()), "{error}");
        let error = IdRange::new(60_000, 10_000).unwrap_err();
        assert!(error.contains("65534"), "{error}");
        assert_eq!(IdRange::new(u32::MAX - 10, 10).unwrap().count(), 10);
        assert_eq!(IdRange::DEFAULT.first(), 0x7000_0000);
    }

    #[test]
    fn the_same_vm_directory_asks_for_the_same_uid_first() {
        let range = test_range(0x7100_0000, 1 << 20);
        let one = Path::new("/run/husk/vm/0123456789abcdef");
        let other = Path::new("/run/husk/vm/fedcba9876543210");
        assert_eq!(range.id_at(start_index(one)), range.id_at(start_index(one)));
        assert_ne!(
            range.id_at(start_index(one)),
            range.id_at(start_index(other))
        );
    }

    #[test]
    fn a_held_uid_is_not_given_twice_and_is_free_again_once_dropped() {
        let range = test_range(0x7200_0000 + std::process::id() % 4096 * 4, 2);
        let vm_dir = Path::new("/run/husk/vm/lease-test");
        let leases = tempfile::tempdir().unwrap();
        let lease_dir = leases.path().join("qemu-ids");
        let take = || UidLease::take(range, vm_dir, &lease_dir, "hypervisor.qemu_id_count");
        let first = take().unwrap();
        let second = take().unwrap();
        assert_ne!(first.identity().uid, second.identity().uid);
        for lease in [&first, &second] {
            let id = lease.identity();
            assert!(
                id.uid >= range.first() && id.uid < range.first() + 2,
                "{id}"
            );
            assert_eq!(id.uid, id.gid);
            assert!(id.groups.is_empty());
        }
        let error = take().unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("hypervisor.qemu_id_count") && message.contains("2 held"),
            "{message}"
        );
        let freed = first.identity().uid;
        drop(first);
        assert!(
            !lease_dir.join(format!("{freed}.lock")).exists(),
            "a freed lease leaves no file"
        );
        let again = take().unwrap();
        assert_eq!(again.identity().uid, freed);
        drop((second, again));
        assert_eq!(std::fs::read_dir(&lease_dir).unwrap().count(), 0);
    }

    #[test]
    fn stale_lease_files_are_removed_and_held_ones_kept() {
        let leases = tempfile::tempdir().unwrap();
        let dir = leases.path().join("qemu-ids");
        let range = test_range(0x7500_0000 + std::process::id() % 4096 * 4, 1);
        let held =
            UidLease::take(range, Path::new("/y"), &dir, "hypervisor.qemu_id_count").unwrap();
        // What a shim killed with its QEMU leaves: an unlocked file.
        std::fs::write(dir.join("1879048193.lock"), b"").unwrap();
        assert_eq!(remove_stale_leases(&dir), 1);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![format!("{}.lock", held.identity().uid)]);
    }

    #[test]
    fn a_lease_directory_others_can_write_is_refused() {
        let leases = tempfile::tempdir().unwrap();
        let open = leases.path().join("open");
        std::fs::create_dir(&open).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = UidLease::take(
            test_range(0x7300_0000, 1),
            Path::new("/x"),
            &open,
            "hypervisor.qemu_id_count",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("no one else can write") && error.contains("0777"),
            "{error}"
        );
    }

    #[test]
    fn a_uid_some_process_runs_as_is_skipped() {
        // A process running as the range's only id (a sleeper made for it
        // as root; this test's own process otherwise): nothing is free,
        // although no lease holds it.
        let (id, sleeper) = if crate::testing::is_root() {
            use std::os::unix::process::CommandExt;
            let id = 0x7400_0000 + std::process::id() % 4096;
            let child = std::process::Command::new("sleep")
                .arg("1000")
                .uid(id)
                .gid(id)
                .spawn()
                .unwrap();
            (id, Some(child))
        } else {
            // SAFETY: getuid(2) has no preconditions and cannot fail.
            (unsafe { libc::getuid() }, None)
        };
        let leases = tempfile::tempdir().unwrap();
        let outcome = UidLease::take(
            test_range(id, 1),
            Path::new("/x"),
            &leases.path().join("qemu-ids"),
            "hypervisor.qemu_id_first",
        );
        if let Some(mut sleeper) = sleeper {
            sleeper.kill().unwrap();
            sleeper.wait().unwrap();
        }
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("0 held"), "{error}");
    }

    #[test]
    fn status_ids_reads_every_uid_and_gid_column() {
        let status = "Name:\tqemu\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9\n";
        let ids: Vec<u32> = status_ids(status).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn files_are_opened_with_qemus_ids_not_roots() {
        if !crate::testing::is_root() {
            println!(
                "husk-test-form: qemu identity access check: not run: changing ids needs root"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let open = dir.path().join("bzImage");
        let closed = dir.path().join("initrd");
        std::fs::write(&open, b"k").unwrap();
        std::fs::write(&closed, b"i").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o600)).unwrap();
        let identity = QemuIdentity {
            uid: 0x7300_0000,
            gid: 0x7300_0000,
            groups: Vec::new(),
        };
        identity
            .check_access("guest kernel", &open, false, "hypervisor.qemu_kernel")
            .unwrap();
        let error = identity
            .check_access("initramfs", &closed, false, "hypervisor.initrd")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&closed.display().to_string())
                && error.contains("hypervisor.initrd")
                && error.contains("uid 1929379840"),
            "{error}"
        );
        // A directory above that the uid cannot search hides the file too.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(identity
            .check_access("guest kernel", &open, false, "hypervisor.qemu_kernel")
            .is_err());
        // The calling thread kept root's ids.
        assert!(std::fs::read(&closed).is_ok());
    }

    #[test]
    fn kvm_group_is_added_only_when_the_device_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("kvm");
        std::fs::write(&device, b"").unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let group = std::fs::metadata(&device).unwrap().gid();
        let identity = || QemuIdentity {
            uid: 0x7300_0001,
            gid: 0x7300_0001,
            groups: Vec::new(),
        };
        std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut open = identity();
        open.allow_kvm(&device, "hypervisor.qemu_run_as").unwrap();
        assert!(open.groups.is_empty());
        std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o660)).unwrap();
        let mut grouped = identity();
        grouped
            .allow_kvm(&device, "hypervisor.qemu_run_as")
            .unwrap();
        assert_eq!(grouped.groups, [group]);
        std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = identity()
            .allow_kvm(&device, "hypervisor.qemu_run_as")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&device.display().to_string())
                && error.contains("0600")
                && error.contains("hypervisor.qemu_run_as"),
            "{error}"
        );
    }
}
