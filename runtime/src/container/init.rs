//! The container side of create and exec: the two stages forked from the
//! runtime, which enter namespaces and set up the process before `execve`.
//!
//! Stage 1 waits until the runtime has put it in the container's cgroups,
//! enters or creates the user namespace (the runtime writes the id maps from
//! outside), joins and creates the other namespaces, and forks stage 2 — the
//! fork is what puts stage 2 inside a new pid namespace — then exits. The
//! runtime is a child subreaper, so stage 2 becomes its child. Stage 2 builds
//! the rootfs, pivots, sets up the terminal, hostname, sysctls, rlimits,
//! seccomp, user and capabilities, reports `Ready`, and blocks opening the
//! exec fifo until `start` opens its other end; then it execs. Every failure
//! before `Ready` goes back over the channel as text.
//!
//! Both stages write to the same channel, so their order on it is set here:
//! stage 2 says nothing until stage 1 has sent `Stage2Pid` (see
//! [`fork_stage2`]). The runtime can then read the channel as one ordered
//! conversation — the pid first, then whatever stage 2 has to say.

use crate::capabilities::CapabilityMasks;
use crate::cgroups::CgroupPaths;
use crate::error::{sys, Context, Error, Result};
use crate::hooks::{run_hooks, HookKind};
use crate::namespaces::{clone_flag, proc_name, NamespaceSet};
use crate::rootfs::{self, mounts::MountContext};
use crate::sync::{Channel, Message};
use crate::{console, process, seccomp};
use nix::unistd::{ForkResult, Gid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// What the create stages need, prepared by the runtime before forking.
pub struct CreateInit<'a> {
    pub spec: &'a Spec,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub namespaces: &'a NamespaceSet,
    pub cgroups: &'a CgroupPaths,
    /// O_PATH descriptor of the state directory holding `exec.fifo`.
    pub state_dir_fd: RawFd,
    pub console_socket: Option<RawFd>,
    pub preserve_fds: i32,
}

/// What the exec stages need.
pub struct ExecInit<'a> {
    pub process: &'a Process,
    pub spec: &'a Spec,
    /// `/proc/<pid>/ns/*` of the container's init to join.
    pub namespaces: Vec<(LinuxNamespaceType, OwnedFd)>,
    pub console_socket: Option<RawFd>,
    pub preserve_fds: i32,
}

/// Run `f` in the child and exit with its status, reporting errors.
fn child_main(chan: &Channel, f: impl FnOnce() -> Result<()>) -> ! {
    let code = match f() {
        Ok(()) => 0,
        Err(e) => {
            if chan.send(&Message::Error(e.child_message())).is_err() {
                eprintln!("{e}");
            }
            1
        }
    };
    // SAFETY: _exit skips atexit handlers and buffered output that belong
    // to the parent's copy of the process.
    unsafe { libc::_exit(code) }
}

/// Fork stage 1 of a create. Returns its pid in the parent.
pub fn fork_create(
    init: &CreateInit<'_>,
    parent_end: &Channel,
    child_end: &Channel,
) -> Result<i32> {
    // SAFETY: the runtime is single-threaded here (the CLI is; library
    // users must fork from a single-threaded context as documented on
    // `ContainerBuilder::create`), so the child may run arbitrary code.
    match sys(unsafe { nix::unistd::fork() }, "fork", "container init")? {
        ForkResult::Parent { child } => Ok(child.as_raw()),
        ForkResult::Child => {
            // The child only talks through its own end.
            let _ = nix::unistd::close(parent_end.raw_fd());
            child_main(child_end, || create_stage1(init, child_end))
        }
    }
}

fn create_stage1(init: &CreateInit<'_>, chan: &Channel) -> Result<()> {
    expect(chan, Message::Go, "cgroup setup")?;
    init.namespaces.join_user()?;
    if init.namespaces.creates(LinuxNamespaceType::User) {
        sys(
            nix::sched::unshare(clone_flag(LinuxNamespaceType::User)),
            "unshare",
            "user namespace",
        )?;
        chan.send(&Message::UsernsReady)?;
        expect(chan, Message::MapsDone, "uid/gid maps")?;
        become_namespace_root()?;
    }
    init.namespaces.enter_non_user()?;
    fork_stage2(chan, "container process", || create_stage2(init, chan))
}

/// Fork stage 2 from stage 1 and report its pid to the runtime, in that
/// order on the channel: `Stage2Pid` is always the first message the
/// runtime reads after stage 1's own, never behind stage 2's `Ready`,
/// `RunCreateRuntimeHooks` or `Error`.
///
/// Without that order, a stage 2 scheduled before its parent got back from
/// `fork` could write `Ready` (or an early error) ahead of the pid, and the
/// runtime — which needs the pid before anything stage 2 says — failed
/// the create with "unexpected Ready while waiting for the container pid".
/// Rather than teach the runtime to buffer out-of-order messages, stage 2
/// waits at a [`PidGate`] that stage 1 opens only once the pid is sent, so
/// the protocol stays one strictly ordered conversation on both paths.
fn fork_stage2(chan: &Channel, what: &str, stage2: impl FnOnce() -> Result<()>) -> Result<()> {
    fork_stage2_reporting(
        chan,
        what,
        |pid| chan.send(&Message::Stage2Pid(pid)),
        stage2,
    )
}

/// [`fork_stage2`] with the report as a parameter, so a test can hold stage
/// 1 back after the fork and check that stage 2 still cannot get ahead.
fn fork_stage2_reporting(
    chan: &Channel,
    what: &str,
    report: impl FnOnce(i32) -> Result<()>,
    stage2: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let gate = PidGate::new()?;
    // SAFETY: still single-threaded; see fork_create.
    match sys(unsafe { nix::unistd::fork() }, "fork", what)? {
        ForkResult::Parent { child } => {
            report(child.as_raw())?;
            gate.open();
            Ok(())
        }
        ForkResult::Child => {
            if !gate.wait() {
                // Stage 1 died or failed before reporting our pid: the
                // runtime cannot track this process, and stage 1 already
                // reported its error (or its death reads as end-of-file
                // once we are gone too). Leave quietly.
                // SAFETY: as in child_main.
                unsafe { libc::_exit(1) }
            }
            child_main(chan, stage2)
        }
    }
}

/// A pipe from stage 1 to stage 2 that says "the runtime has your pid".
///
/// Stage 1 writes one byte after sending `Stage2Pid`; stage 2 reads it
/// before doing anything else. If stage 1 exits or is killed first, stage 2
/// reads end-of-file instead and gives up. Both ends are close-on-exec and
/// are closed by each side once used, so nothing reaches the container.
struct PidGate {
    read: OwnedFd,
    write: OwnedFd,
}

impl PidGate {
    fn new() -> Result<Self> {
        let (read, write) = sys(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC),
            "pipe2",
            "stage 2 gate",
        )?;
        Ok(Self { read, write })
    }

    /// Stage 1, after the pid is on the channel: let stage 2 go.
    fn open(self) {
        drop(self.read);
        // The write fails only if stage 2 is already dead (EPIPE): then
        // there is no one to let go, and the runtime, which has the pid,
        // reads the end of the channel instead of a misleading gate error.
        let _ = nix::unistd::write(&self.write, b"1");
    }

    /// Stage 2: block until stage 1 opened the gate. False if stage 1 went
    /// away (or the read failed) without opening it.
    fn wait(self) -> bool {
        // Our copy of the write end must go, or end-of-file never comes.
        drop(self.write);
        let mut byte = [0u8; 1];
        loop {
            match nix::unistd::read(self.read.as_raw_fd(), &mut byte) {
                Ok(n) => return n == 1,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn expect(chan: &Channel, want: Message, what: &str) -> Result<()> {
    let got = chan.expect(what)?;
    if got == want {
        Ok(())
    } else {
        Err(Error::Init(format!(
            "unexpected {got:?} while waiting for {what}"
        )))
    }
}

fn become_namespace_root() -> Result<()> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    sys(
        nix::unistd::setresgid(root_gid, root_gid, root_gid),
        "setresgid",
        0,
    )?;
    sys(
        nix::unistd::setresuid(root_uid, root_uid, root_uid),
        "setresuid",
        0,
    )?;
    Ok(())
}

fn process_of(spec: &Spec) -> Result<&Process> {
    spec.process()
        .as_ref()
        .ok_or_else(|| Error::spec("process", "missing"))
}

fn create_stage2(init: &CreateInit<'_>, chan: &Channel) -> Result<()> {
    let spec = init.spec;
    let proc_ = process_of(spec)?;
    sys(nix::unistd::setsid(), "setsid", "container process")?;
    let userns = init.namespaces.creates(LinuxNamespaceType::User);
    let ctx = MountContext {
        bundle: init.bundle,
        cgroups: init.cgroups,
        cgroupns: init.namespaces.creates_or_joins(LinuxNamespaceType::Cgroup),
        userns,
    };
    rootfs::prepare(spec, init.rootfs, &ctx)?;
    let hooks = spec.hooks().as_ref();
    let wants_hooks = hooks.is_some_and(|h| {
        [
            h.prestart(),
            h.create_runtime(),
            h.create_container(),
            h.start_container(),
        ]
        .iter()
        .any(|l| l.as_ref().is_some_and(|v| !v.is_empty()))
    });
    let mut hook_state = String::new();
    if wants_hooks {
        chan.send(&Message::RunCreateRuntimeHooks)?;
        match chan.expect("createRuntime hooks")? {
            Message::HooksDone { creating, created } => {
                run_hooks(
                    HookKind::CreateContainer,
                    hooks.and_then(|h| h.create_container().as_ref()),
                    &creating,
                )?;
                hook_state = created;
            }
            other => {
                return Err(Error::Init(format!(
                    "unexpected {other:?} while waiting for hooks"
                )))
            }
        }
    }
    rootfs::setup_dev(spec, init.rootfs, userns)?;
    let cwd_inside = rootfs::resolve(init.rootfs, proc_.cwd(), "process.cwd")?;
    if std::fs::symlink_metadata(&cwd_inside).is_err() {
        std::fs::create_dir_all(&cwd_inside).at("create cwd", &cwd_inside)?;
    }
    rootfs::pivot(init.rootfs)?;
    if proc_.terminal() == Some(true) {
        let socket = init
            .console_socket
            .ok_or_else(|| Error::spec("process.terminal", "a terminal needs a console socket"))?;
        let size = proc_.console_size();
        let slave = console::setup_pty(
            socket,
            size.map_or(0, |s| s.width()),
            size.map_or(0, |s| s.height()),
        )?;
        let _ = nix::unistd::close(socket);
        rootfs::mount_console(&slave)?;
    }
    if let Some(h) = spec.hostname().as_ref().filter(|h| !h.is_empty()) {
        sys(nix::unistd::sethostname(h), "sethostname", h)?;
    }
    if let Some(d) = spec.domainname().as_ref().filter(|d| !d.is_empty()) {
        std::fs::write("/proc/sys/kernel/domainname", d)
            .at("set domainname", "/proc/sys/kernel/domainname")?;
    }
    for (key, value) in spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).at("write sysctl", &path)?;
    }
    rootfs::finalize(spec)?;
    finish_process(proc_, spec, init.preserve_fds, |filter| {
        chan.send(&Message::Ready)?;
        wait_for_start(init.state_dir_fd)?;
        run_hooks(
            HookKind::StartContainer,
            hooks.and_then(|h| h.start_container().as_ref()),
            &hook_state,
        )?;
        Ok(filter)
    })
}

/// Block until `start` opens the other end of `exec.fifo`, then tell it we
/// are going ahead by writing one byte.
fn wait_for_start(state_dir_fd: RawFd) -> Result<()> {
    use nix::fcntl::{openat, OFlag};
    let fd = openat(
        Some(state_dir_fd),
        crate::state::EXEC_FIFO,
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .at("open", crate::state::EXEC_FIFO)?;
    // SAFETY: fd was just opened and is owned here.
    let fifo = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    sys(
        nix::unistd::write(&fifo, b"0"),
        "write",
        crate::state::EXEC_FIFO,
    )?;
    let _ = nix::unistd::close(state_dir_fd);
    Ok(())
}

/// The common tail of create and exec: process attributes, security, and
/// exec. `before_exec` runs after `Ready` could be sent (create waits for
/// `start` there) and hands back the seccomp filter still to install.
fn finish_process(
    proc_: &Process,
    spec: &Spec,
    preserve_fds: i32,
    before_exec: impl FnOnce(Option<seccomp::Filter>) -> Result<Option<seccomp::Filter>>,
) -> Result<()> {
    process::reset_signals();
    process::apply_oom_score_adj(proc_)?;
    process::apply_rlimits(proc_)?;
    let caps = CapabilityMasks::from_spec(proc_.capabilities().as_ref())?;
    let passwd = std::fs::read_to_string("/etc/passwd").ok();
    let env = process::environment(proc_, passwd.as_deref());
    let cwd = proc_.cwd().clone();
    let early_chdir = nix::unistd::chdir(&cwd);
    let args = proc_.args().clone().unwrap_or_default();
    let arg0 = args.first().cloned().unwrap_or_default();
    let filter = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(s) => Some(seccomp::compile(s)?),
        None => None,
    };
    let nnp = proc_.no_new_privileges() == Some(true);
    let user = proc_.user();
    process::fix_stdio_ownership(user.uid(), user.gid());
    if nnp {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return sys(Err(nix::errno::Errno::last()), "prctl", "no_new_privs");
        }
    }
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN, which the
    // user switch may drop: install it now.
    let mut pending = filter;
    if !nnp {
        if let Some(f) = pending.take() {
            seccomp::install(&f)?;
        }
    }
    process::switch_user(proc_, &caps)?;
    process::apply_umask(proc_);
    if early_chdir.is_err() {
        nix::unistd::chdir(&cwd).at("chdir", &cwd)?;
    }
    let path = process::lookup_executable(&arg0, &env)?;
    process::close_extra_fds_on_exec(preserve_fds);
    let pending = before_exec(pending)?;
    if let Some(f) = pending {
        seccomp::install(&f)?;
    }
    Err(process::exec(&path, &args, &env))
}

/// Fork stage 1 of an exec. Returns its pid in the parent.
pub fn fork_exec(init: &ExecInit<'_>, parent_end: &Channel, child_end: &Channel) -> Result<i32> {
    // SAFETY: single-threaded caller; see fork_create.
    match sys(unsafe { nix::unistd::fork() }, "fork", "exec init")? {
        ForkResult::Parent { child } => Ok(child.as_raw()),
        ForkResult::Child => {
            // The child only talks through its own end.
            let _ = nix::unistd::close(parent_end.raw_fd());
            child_main(child_end, || exec_stage1(init, child_end))
        }
    }
}

fn exec_stage1(init: &ExecInit<'_>, chan: &Channel) -> Result<()> {
    expect(chan, Message::Go, "cgroup setup")?;
    // User first: it grants the capabilities needed to join the others.
    let mut ordered: Vec<&(LinuxNamespaceType, OwnedFd)> = init.namespaces.iter().collect();
    ordered.sort_by_key(|(t, _)| match t {
        LinuxNamespaceType::User => 0,
        LinuxNamespaceType::Mount => 2,
        _ => 1,
    });
    for (typ, fd) in ordered {
        sys(
            nix::sched::setns(fd, clone_flag(*typ)),
            "setns",
            proc_name(*typ),
        )?;
    }
    fork_stage2(chan, "exec process", || exec_stage2(init))
}

fn exec_stage2(init: &ExecInit<'_>) -> Result<()> {
    let proc_ = init.process;
    if proc_.terminal() == Some(true) {
        sys(nix::unistd::setsid(), "setsid", "exec process")?;
        let socket = init
            .console_socket
            .ok_or_else(|| Error::spec("process.terminal", "a terminal needs a console socket"))?;
        let size = proc_.console_size();
        console::setup_pty(
            socket,
            size.map_or(0, |s| s.width()),
            size.map_or(0, |s| s.height()),
        )?;
        let _ = nix::unistd::close(socket);
    }
    // The channel is close-on-exec: a successful exec reads as EOF.
    finish_process(proc_, init.spec, init.preserve_fds, Ok)
}

/// Write `/proc/<pid>/{uid,gid}_map` from the spec.
pub fn write_id_maps(pid: i32, spec: &Spec) -> Result<()> {
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| Error::spec("linux", "missing"))?;
    let fmt = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps.iter()
            .flatten()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    let uid_map = format!("/proc/{pid}/uid_map");
    std::fs::write(&uid_map, fmt(linux.uid_mappings())).at("write", &uid_map)?;
    let gid_map = format!("/proc/{pid}/gid_map");
    std::fs::write(&gid_map, fmt(linux.gid_mappings())).at("write", &gid_map)?;
    Ok(())
}

/// The host id that container id 0 maps to (0 without a user namespace).
pub fn host_root_id(maps: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>) -> u32 {
    maps.into_iter()
        .flatten()
        .find(|m| m.container_id() == 0)
        .map_or(0, |m| m.host_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::channel_pair;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    /// The state letter of `pid` from `/proc/<pid>/stat`; `None` once gone.
    fn proc_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// Hold "stage 1" (this process) back after the fork until stage 2 has
    /// gone as far as it can on its own: asleep ('S') if something holds it
    /// — the gate; it does nothing else that sleeps before its first
    /// message — or dead ('Z') if nothing did and it already sent and
    /// exited. Polls the state, with no timing assumption.
    fn until_stage2_is_stuck_or_done(pid: i32) {
        loop {
            match proc_state(pid) {
                Some('S' | 'Z' | 'X') | None => return,
                _ => std::thread::yield_now(),
            }
        }
    }

    /// The interleaving behind "unexpected Ready while waiting for the
    /// container pid": stage 2 runs to its `Ready` before stage 1 is back
    /// from `fork` to report the pid. Forced here on every run by making
    /// stage 1 wait for stage 2 before reporting; the runtime's end must
    /// still read the pid first, then `Ready`. (Without the gate, stage 2
    /// sends `Ready` and exits before the pid is sent, and this fails.)
    #[test]
    fn the_pid_reaches_the_runtime_before_anything_stage2_says() {
        let (runtime_end, child_end) = channel_pair().unwrap();
        let mut stage2 = 0;
        fork_stage2_reporting(
            &child_end,
            "test stage 2",
            |pid| {
                stage2 = pid;
                until_stage2_is_stuck_or_done(pid);
                child_end.send(&Message::Stage2Pid(pid))
            },
            || child_end.send(&Message::Ready),
        )
        .unwrap();
        assert_eq!(
            runtime_end.recv().unwrap(),
            Some(Message::Stage2Pid(stage2))
        );
        assert_eq!(runtime_end.recv().unwrap(), Some(Message::Ready));
        assert_eq!(
            waitpid(Pid::from_raw(stage2), None).unwrap(),
            WaitStatus::Exited(Pid::from_raw(stage2), 0)
        );
    }

    /// If stage 1 fails (or dies) before reporting the pid, stage 2 must not
    /// carry on as a process the runtime does not know: it leaves without a
    /// word, and the runtime sees only stage 1's error or end-of-file.
    #[test]
    fn stage2_gives_up_when_stage1_never_reports_its_pid() {
        let (runtime_end, child_end) = channel_pair().unwrap();
        let mut stage2 = 0;
        let err = fork_stage2_reporting(
            &child_end,
            "test stage 2",
            |pid| {
                stage2 = pid;
                until_stage2_is_stuck_or_done(pid);
                Err(Error::Init("stage 1 failed".into()))
            },
            || child_end.send(&Message::Ready),
        )
        .unwrap_err();
        assert!(err.to_string().contains("stage 1 failed"), "{err}");
        assert_eq!(
            waitpid(Pid::from_raw(stage2), None).unwrap(),
            WaitStatus::Exited(Pid::from_raw(stage2), 1)
        );
        drop(child_end);
        assert_eq!(runtime_end.recv().unwrap(), None);
    }
}
