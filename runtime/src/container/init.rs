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
use std::os::fd::{OwnedFd, RawFd};
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
    // SAFETY: still single-threaded; see fork_create.
    match sys(unsafe { nix::unistd::fork() }, "fork", "container process")? {
        ForkResult::Parent { child } => {
            chan.send(&Message::Stage2Pid(child.as_raw()))?;
            Ok(())
        }
        ForkResult::Child => child_main(chan, || create_stage2(init, chan)),
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
    // SAFETY: single-threaded; see fork_create.
    match sys(unsafe { nix::unistd::fork() }, "fork", "exec process")? {
        ForkResult::Parent { child } => {
            chan.send(&Message::Stage2Pid(child.as_raw()))?;
            Ok(())
        }
        ForkResult::Child => child_main(chan, || exec_stage2(init)),
    }
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
