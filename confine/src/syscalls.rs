//! The seccomp allowlists, one per [`ThreadClass`].
//!
//! Where the entries come from: each list is what the class's own code and
//! the libraries it calls reach on x86_64 Linux with glibc, read from the
//! code paths (Rust std's thread start and exit, the allocator, `tracing`'s
//! writer; vhost-user-backend's session and vring workers; fuse-backend-rs's
//! passthrough; kvm-ioctls' vCPU loop; the virtio-balloon worker's discards
//! of guest memory) and then checked by running the
//! e2e tier with `seccomp_action = "trap"`, which logs every call a list
//! lacks (the guest and hostile tiers run them under the default "kill",
//! so a missing call fails them). A missing call shows up under "trap" as
//! one log line naming the thread and the call.
//!
//! What is left out on purpose: no class may `execve`, `ptrace`, mount,
//! load modules or BPF, open perf events, use keyrings, `userfaultfd`,
//! `process_vm_*`, `setns`/`unshare` of anything but its own fs context, or
//! `open_by_handle_at` (the "shocker" escape). Device threads may not open
//! files (their opens fail with EACCES); they work on fds they were given.

use crate::ThreadClass;

/// One argument condition of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgCheck {
    /// `args[index] == value`.
    Equals { index: usize, value: u64 },
    /// `args[index] & mask == value`.
    MaskedEquals { index: usize, mask: u64, value: u64 },
}

/// One allowed system call, optionally only with some argument values
/// (several rules for one call are alternatives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub name: &'static str,
    pub args: &'static [ArgCheck],
}

const fn any(name: &'static str) -> Rule {
    Rule { name, args: &[] }
}

const fn with(name: &'static str, args: &'static [ArgCheck]) -> Rule {
    Rule { name, args }
}

/// Calls that fail with ENOSYS instead of violating: `clone3`, whose
/// argument is a pointer a filter cannot inspect, so glibc falls back to
/// `clone`, whose flags it can.
pub const ENOSYS_CALLS: &[&str] = &["clone3"];

/// Opens a class without [`FILES`] makes fail with EACCES rather than
/// violate: glibc's malloc opens `/sys/devices/system/cpu/online` (then
/// `/proc/stat`) when a thread first needs an arena, and falls back when
/// the open fails. The file stays closed to the thread all the same.
pub const EACCES_OPENS: &[&str] = &["open", "openat", "openat2"];

/// The calls `class` is refused with EACCES instead of a violation.
pub fn refused_for(class: ThreadClass) -> &'static [&'static str] {
    match class {
        ThreadClass::Device => EACCES_OPENS,
        ThreadClass::FsWorker | ThreadClass::Vcpu => &[],
    }
}

const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;
const FIONBIO: u64 = libc::FIONBIO;
const FIOCLEX: u64 = libc::FIOCLEX;
const PR_SET_NAME: u64 = libc::PR_SET_NAME as u64;
const PR_GET_NAME: u64 = libc::PR_GET_NAME as u64;
const CLONE_FS: u64 = libc::CLONE_FS as u64;
/// `_IOC_TYPE` of every KVM ioctl (linux/kvm.h: KVMIO).
const KVMIO_TYPE: u64 = 0xAE << 8;

/// What any confined thread needs to run Rust code at all: memory, futexes,
/// time, its own signals, thread start and exit, reads and writes on fds it
/// holds (the log included), polling.
pub const BASE: &[Rule] = &[
    any("read"),
    any("write"),
    any("readv"),
    any("writev"),
    any("close"),
    any("futex"),
    any("mmap"),
    any("munmap"),
    any("mremap"),
    any("mprotect"),
    // The allocator's; also how the virtio-balloon worker releases guest
    // memory: the built-in VMM's is private (anonymous, or a template's
    // file mapped MAP_PRIVATE), so MADV_DONTNEED is all it needs. No
    // device thread may punch holes in files (`fallocate` is FILES').
    any("madvise"),
    any("brk"),
    any("rt_sigprocmask"),
    any("rt_sigreturn"),
    any("sigaltstack"),
    any("exit"),
    any("exit_group"),
    any("gettid"),
    any("getpid"),
    any("getuid"),
    any("geteuid"),
    any("getgid"),
    any("getegid"),
    any("sched_yield"),
    any("sched_getaffinity"),
    any("clock_gettime"),
    any("clock_nanosleep"),
    any("nanosleep"),
    any("getrandom"),
    any("restart_syscall"),
    any("rseq"),
    any("set_robust_list"),
    any("fcntl"),
    any("dup"),
    any("fstat"),
    any("newfstatat"),
    any("statx"),
    any("lseek"),
    any("poll"),
    any("ppoll"),
    any("epoll_create1"),
    any("epoll_ctl"),
    any("epoll_wait"),
    any("epoll_pwait"),
    any("eventfd2"),
    any("pipe2"),
    any("tgkill"),
    // Threads only (vhost-user vring workers, device workers).
    with(
        "clone",
        &[ArgCheck::MaskedEquals {
            index: 0,
            mask: CLONE_THREAD,
            value: CLONE_THREAD,
        }],
    ),
    with(
        "prctl",
        &[ArgCheck::Equals {
            index: 0,
            value: PR_SET_NAME,
        }],
    ),
    with(
        "prctl",
        &[ArgCheck::Equals {
            index: 0,
            value: PR_GET_NAME,
        }],
    ),
    with(
        "ioctl",
        &[ArgCheck::Equals {
            index: 1,
            value: FIONBIO,
        }],
    ),
    with(
        "ioctl",
        &[ArgCheck::Equals {
            index: 1,
            value: FIOCLEX,
        }],
    ),
];

/// `TUNSETOFFLOAD` (linux/if_tun.h `_IOW('T', 208, unsigned int)`).
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;

/// Sockets a device already holds or is handed: vhost-user messages with
/// fds (guest memory, kick/call eventfds), the vsock muxer's Unix streams
/// to host services (`AF_UNIX` only) and its hybrid-vsock listener; and
/// the pod's TAP, whose offloads virtio-net sets from the features the
/// guest acked (`TUNSETOFFLOAD` only; the TAP is opened before).
pub const SOCKETS: &[Rule] = &[
    with(
        "ioctl",
        &[ArgCheck::Equals {
            index: 1,
            value: TUNSETOFFLOAD,
        }],
    ),
    any("recvfrom"),
    any("recvmsg"),
    any("sendto"),
    any("sendmsg"),
    any("accept"),
    any("accept4"),
    any("connect"),
    any("shutdown"),
    any("getsockopt"),
    any("setsockopt"),
    any("getsockname"),
    any("getpeername"),
    any("getdents64"),
    // The vsock muxer's connection timers.
    any("timerfd_create"),
    any("timerfd_settime"),
    any("timerfd_gettime"),
    with(
        "socket",
        &[ArgCheck::Equals {
            index: 0,
            value: libc::AF_UNIX as u64,
        }],
    ),
];

/// A passthrough's file operations on the share, acting as the guest's
/// users (fs uid/gid switches and the CAP_FSETID toggle of a write that
/// kills suid bits).
pub const FILES: &[Rule] = &[
    any("openat"),
    any("openat2"),
    any("pread64"),
    any("pwrite64"),
    any("preadv"),
    any("pwritev"),
    any("preadv2"),
    any("pwritev2"),
    any("copy_file_range"),
    any("ftruncate"),
    any("fallocate"),
    any("fsync"),
    any("fdatasync"),
    any("flock"),
    any("fchmod"),
    any("fchmodat"),
    any("fchown"),
    any("fchownat"),
    any("mkdirat"),
    any("mknodat"),
    any("symlinkat"),
    any("linkat"),
    any("unlinkat"),
    any("renameat"),
    any("renameat2"),
    any("readlinkat"),
    any("utimensat"),
    any("statfs"),
    any("fstatfs"),
    any("fchdir"),
    any("umask"),
    any("getxattr"),
    any("lgetxattr"),
    any("fgetxattr"),
    any("setxattr"),
    any("lsetxattr"),
    any("fsetxattr"),
    any("listxattr"),
    any("llistxattr"),
    any("flistxattr"),
    any("removexattr"),
    any("lremovexattr"),
    any("fremovexattr"),
    any("setresuid"),
    any("setresgid"),
    any("setfsuid"),
    any("setfsgid"),
    any("capget"),
    any("capset"),
    // A worker's own fs context (its umask), nothing else.
    with(
        "unshare",
        &[ArgCheck::Equals {
            index: 0,
            value: CLONE_FS,
        }],
    ),
];

/// The vCPU loop's KVM ioctls.
pub const KVM: &[Rule] = &[with(
    "ioctl",
    &[ArgCheck::MaskedEquals {
        index: 1,
        mask: 0xff00,
        value: KVMIO_TYPE,
    }],
)];

/// The rule lists that make up `class`'s allowlist.
///
/// A vCPU thread of the built-in VMM activates devices when the guest
/// writes DRIVER_OK, and the device workers it starts inherit its filter
/// (filters only stack), so the vCPU list includes the device and
/// virtio-fs lists; moving activation to a VMM thread would narrow it.
pub fn lists_for(class: ThreadClass) -> &'static [&'static [Rule]] {
    match class {
        ThreadClass::Device => &[BASE, SOCKETS],
        ThreadClass::FsWorker => &[BASE, SOCKETS, FILES],
        ThreadClass::Vcpu => &[BASE, SOCKETS, FILES, KVM],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_system_call_of_this_architecture() {
        for class in ThreadClass::ALL {
            for rule in lists_for(class).iter().flat_map(|list| list.iter()) {
                assert!(
                    matches!(
                        husk_runtime::seccomp::syscall_number(rule.name),
                        husk_runtime::seccomp::SyscallLookup::Native(_)
                    ),
                    "{} in the {} list is not an x86_64 system call",
                    rule.name,
                    class.name()
                );
            }
        }
    }

    #[test]
    fn no_class_may_exec_mount_trace_or_open_by_handle() {
        for class in ThreadClass::ALL {
            let names: Vec<&str> = lists_for(class)
                .iter()
                .flat_map(|list| list.iter().map(|rule| rule.name))
                .collect();
            for forbidden in [
                "execve",
                "execveat",
                "ptrace",
                "mount",
                "umount2",
                "init_module",
                "bpf",
                "open_by_handle_at",
                "setns",
                "process_vm_writev",
                "kexec_load",
            ] {
                assert!(
                    !names.contains(&forbidden),
                    "{forbidden} in the {} list",
                    class.name()
                );
            }
        }
    }

    #[test]
    fn device_threads_may_not_fallocate_at_all() {
        let fallocate: Vec<&Rule> = lists_for(ThreadClass::Device)
            .iter()
            .flat_map(|list| list.iter())
            .filter(|rule| rule.name == "fallocate")
            .collect();
        assert!(fallocate.is_empty(), "{fallocate:?}");
    }

    #[test]
    fn only_the_fs_class_opens_files() {
        let device: Vec<&str> = lists_for(ThreadClass::Device)
            .iter()
            .flat_map(|list| list.iter().map(|rule| rule.name))
            .collect();
        assert!(!device.contains(&"openat"));
        assert!(!device.contains(&"openat2"));
    }
}
