//! Containers: [`ContainerBuilder`] creates one from a bundle, and
//! [`Container`] drives an existing one through the OCI lifecycle (start,
//! exec, kill, pause/resume, state, delete).
//!
//! Create is transactional: every resource it makes (state directory,
//! cgroups, processes) is recorded in a cleanup guard that undoes them all
//! if any later step fails, so a failed create leaves nothing behind. Mounts
//! live only in the container's own mount namespace and vanish with it.

mod init;

use crate::cgroups::CgroupPaths;
use crate::error::{sys, Context, Error, Result};
use crate::hooks::{run_hooks, HookKind};
use crate::namespaces::{proc_name, NamespaceSet};
use crate::state::{ContainerRecord, StateStore, Status, EXEC_FIFO};
use crate::sync::{channel_pair, Message};
use crate::{spec, DEFAULT_STATE_ROOT};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `start` waits for the init to answer on the exec fifo, and
/// `delete` for killed processes to disappear.
const PROCESS_WAIT_MS: u64 = 10_000;

/// Builder for a new container.
#[derive(Debug)]
pub struct ContainerBuilder {
    id: String,
    root: PathBuf,
    bundle: PathBuf,
    pid_file: Option<PathBuf>,
    console_socket: Option<PathBuf>,
    console_fd: Option<OwnedFd>,
    preserve_fds: i32,
}

/// Undo list for a create in progress.
struct CreateCleanup {
    store: StateStore,
    id: String,
    cgroups: Option<CgroupPaths>,
    pids: Vec<i32>,
    armed: bool,
}

impl Drop for CreateCleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for pid in &self.pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(*pid), None);
        }
        if let Some(cg) = &self.cgroups {
            for pid in cg.pids() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = cg.destroy();
        }
        let _ = self.store.remove(&self.id);
    }
}

impl ContainerBuilder {
    /// A container called `id`, with the default state root and the
    /// current directory as bundle.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            root: PathBuf::from(DEFAULT_STATE_ROOT),
            bundle: PathBuf::from("."),
            pid_file: None,
            console_socket: None,
            console_fd: None,
            preserve_fds: 0,
        }
    }

    /// An already connected console socket (instead of a path).
    pub fn with_console_fd(mut self, fd: OwnedFd) -> Self {
        self.console_fd = Some(fd);
        self
    }

    /// The state root (runc's `--root`).
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// The bundle directory holding `config.json`.
    pub fn with_bundle(mut self, bundle: impl Into<PathBuf>) -> Self {
        self.bundle = bundle.into();
        self
    }

    /// Write the container process's pid here once created.
    pub fn with_pid_file(mut self, path: Option<PathBuf>) -> Self {
        self.pid_file = path;
        self
    }

    /// Unix socket that receives the terminal master (`process.terminal`).
    pub fn with_console_socket(mut self, path: Option<PathBuf>) -> Self {
        self.console_socket = path;
        self
    }

    /// Pass descriptors 3..3+n to the container process.
    pub fn with_preserve_fds(mut self, n: i32) -> Self {
        self.preserve_fds = n;
        self
    }

    /// Create the container: its init waits for [`Container::start`].
    ///
    /// Forks: call it from a single-threaded process (or a thread-free
    /// context), as with runc's own init.
    pub fn create(self) -> Result<Container> {
        crate::state::validate_id(&self.id)?;
        let bundle = std::fs::canonicalize(&self.bundle).at("open bundle", &self.bundle)?;
        let spec = spec::load(&bundle)?;
        spec::validate(&spec, &bundle)?;
        let rootfs = spec::rootfs_path(&spec, &bundle)?;
        let rootfs = std::fs::canonicalize(&rootfs).at("open rootfs", &rootfs)?;
        let namespaces = NamespaceSet::from_spec(&spec)?;
        if !namespaces.creates_or_joins(LinuxNamespaceType::Mount) {
            return Err(Error::spec(
                "linux.namespaces",
                "a mount namespace is required",
            ));
        }
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| Error::spec("linux", "missing"))?;
        let terminal = spec.process().as_ref().and_then(|p| p.terminal()) == Some(true);
        let has_console = self.console_socket.is_some() || self.console_fd.is_some();
        if terminal && !has_console {
            return Err(Error::InvalidArgument(
                "cannot allocate tty if runc will detach without setting console socket".into(),
            ));
        }
        if !terminal && has_console {
            return Err(Error::InvalidArgument(
                "cannot use console socket if runc will not detach or allocate tty".into(),
            ));
        }
        let store = StateStore::new(&self.root);
        let dir = store.create_dir(&self.id)?;
        let mut cleanup = CreateCleanup {
            store: store.clone(),
            id: self.id.clone(),
            cgroups: None,
            pids: Vec::new(),
            armed: true,
        };
        let cgroups = CgroupPaths::for_container(linux.cgroups_path().as_deref(), &self.id)?;
        cleanup.cgroups = Some(cgroups.clone());
        cgroups.create()?;

        let fifo = dir.join(EXEC_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o622))
            .at("mkfifo", &fifo)?;
        let root_uid = init::host_root_id(linux.uid_mappings().as_ref());
        let root_gid = init::host_root_id(linux.gid_mappings().as_ref());
        std::os::unix::fs::chown(&fifo, Some(root_uid), Some(root_gid)).at("chown", &fifo)?;
        // umask may have masked the fifo's mode.
        nix::sys::stat::fchmodat(
            None,
            &fifo,
            nix::sys::stat::Mode::from_bits_truncate(0o622),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .at("chmod", &fifo)?;
        let dir_fd = nix::fcntl::open(
            &dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .at("open", &dir)?;
        // SAFETY: dir_fd was just opened and is owned here.
        let dir_fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dir_fd) };
        let console = match self.console_fd {
            Some(fd) => Some(fd),
            None => self
                .console_socket
                .as_deref()
                .map(crate::console::connect)
                .transpose()?,
        };

        // SAFETY: prctl with integer arguments only. The container process is
        // a grandchild; as subreaper we inherit it when stage 1 exits.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let (parent_end, child_end) = channel_pair()?;
        let create_init = init::CreateInit {
            spec: &spec,
            bundle: &bundle,
            rootfs: &rootfs,
            namespaces: &namespaces,
            cgroups: &cgroups,
            state_dir_fd: dir_fd.as_raw_fd(),
            console_socket: console.as_ref().map(|c| c.as_raw_fd()),
            preserve_fds: self.preserve_fds,
        };
        let stage1 = init::fork_create(&create_init, &parent_end, &child_end)?;
        drop(child_end);
        drop(console);
        drop(dir_fd);
        cleanup.pids.push(stage1);
        cgroups.join(stage1)?;
        parent_end.send(&Message::Go)?;
        let mut msg = parent_end.expect("namespace setup")?;
        if msg == Message::UsernsReady {
            init::write_id_maps(stage1, &spec)?;
            parent_end.send(&Message::MapsDone)?;
            msg = parent_end.expect("namespace setup")?;
        }
        // Stage 2 cannot speak before stage 1 has sent its pid (it waits at
        // a gate stage 1 opens after sending; see init::fork_stage2), so the
        // pid is next on the channel and anything else is a protocol bug.
        let Message::Stage2Pid(pid) = msg else {
            return Err(Error::Init(format!(
                "unexpected {msg:?} while waiting for the container pid"
            )));
        };
        cleanup.pids.push(pid);
        let _ = waitpid(Pid::from_raw(stage1), None);
        cleanup.pids.retain(|p| *p != stage1);

        let pid_start_time = crate::state::proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        let record = ContainerRecord {
            id: self.id.clone(),
            pid,
            pid_start_time,
            bundle: bundle.clone(),
            rootfs: rootfs.clone(),
            created: crate::state::now_rfc3339_nano(),
            owner: String::new(),
            cgroups: cgroups.clone(),
            spec: spec.clone(),
        };
        loop {
            match parent_end.expect("the container is ready")? {
                Message::RunCreateRuntimeHooks => {
                    let state = serde_json::to_string(&record.hook_state(Status::Creating))
                        .map_err(|e| Error::Init(e.to_string()))?;
                    let hooks = spec.hooks().as_ref();
                    run_hooks(
                        HookKind::Prestart,
                        hooks.and_then(|h| h.prestart().as_ref()),
                        &state,
                    )?;
                    run_hooks(
                        HookKind::CreateRuntime,
                        hooks.and_then(|h| h.create_runtime().as_ref()),
                        &state,
                    )?;
                    let created = serde_json::to_string(&record.hook_state(Status::Created))
                        .map_err(|e| Error::Init(e.to_string()))?;
                    parent_end.send(&Message::HooksDone {
                        creating: state,
                        created,
                    })?;
                }
                Message::Ready => break,
                other => {
                    return Err(Error::Init(format!(
                        "unexpected {other:?} from the container init"
                    )))
                }
            }
        }
        if let Some(res) = linux.resources() {
            cgroups.apply(res)?;
        }
        store.save(&record)?;
        if let Some(pid_file) = &self.pid_file {
            write_pid_file(pid_file, pid)?;
        }
        cleanup.armed = false;
        tracing::debug!(container = %self.id, pid, "created");
        Ok(Container { store, record })
    }
}

/// Wait for the created init's byte on `exec.fifo`, opened non-blocking as
/// `fd` (the init writes it once `start` has opened the fifo, then execs).
/// `alive` says whether the init still runs; a dead init that never wrote
/// is a stopped container (`InvalidArgument`).
fn await_exec_fifo(
    fd: &OwnedFd,
    fifo: &Path,
    deadline: Instant,
    alive: impl Fn() -> bool,
) -> Result<()> {
    let mut byte = [0u8; 1];
    let mut read_byte = || loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut byte) {
            Ok(n) => return Ok(n == 1),
            Err(nix::errno::Errno::EAGAIN) => return Ok(false),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return sys(Err(e), "read", fifo.display()),
        }
    };
    loop {
        if read_byte()? {
            return Ok(());
        }
        if !alive() {
            // Between the read above and this check the init may have
            // written its byte, exec'd a short command, exited and been
            // reaped (a loaded machine, many creates at once). Then it did
            // start: the byte is in the fifo. Only a dead init with no
            // byte never started.
            if read_byte()? {
                return Ok(());
            }
            return Err(Error::InvalidArgument(
                "cannot start a container that has stopped".into(),
            ));
        }
        if Instant::now() > deadline {
            return Err(Error::Init(
                "container init did not answer on exec.fifo".into(),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Write `pid` to `path` atomically, as runc's `--pid-file`.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string()).at("write pid file", &tmp)?;
    std::fs::rename(&tmp, path).at("write pid file", path)
}

/// Options for [`Container::exec`].
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// The process to run (args, env, cwd, user, caps, terminal...).
    pub process: Option<Process>,
    pub console_socket: Option<PathBuf>,
    /// An already connected console socket (instead of a path).
    pub console_fd: Option<std::sync::Arc<OwnedFd>>,
    pub pid_file: Option<PathBuf>,
    pub preserve_fds: i32,
}

/// An existing container.
#[derive(Debug)]
pub struct Container {
    store: StateStore,
    record: ContainerRecord,
}

impl Container {
    /// Load container `id` from the state root.
    pub fn load(root: impl Into<PathBuf>, id: &str) -> Result<Self> {
        let store = StateStore::new(root);
        let record = store.load(id)?;
        Ok(Self { store, record })
    }

    /// Every container id under `root`.
    pub fn list(root: impl Into<PathBuf>) -> Vec<String> {
        StateStore::new(root).list()
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The container process's pid (host view).
    pub fn pid(&self) -> i32 {
        self.record.pid
    }

    /// The stored record.
    pub fn record(&self) -> &ContainerRecord {
        &self.record
    }

    /// The current lifecycle status.
    pub fn status(&self) -> Status {
        if !self.record.process_alive() {
            Status::Stopped
        } else if self.store.dir(&self.record.id).join(EXEC_FIFO).exists() {
            Status::Created
        } else if self.record.cgroups.is_frozen() {
            Status::Paused
        } else {
            Status::Running
        }
    }

    /// `runc state` JSON.
    pub fn state_json(&self) -> Result<String> {
        serde_json::to_string_pretty(&self.record.runc_state(self.status()))
            .map_err(|e| Error::Init(e.to_string()))
    }

    fn hook_state_json(&self, status: Status) -> String {
        serde_json::to_string(&self.record.hook_state(status)).unwrap_or_default()
    }

    /// Let the created init exec the user's process, then run poststart.
    pub fn start(&self) -> Result<()> {
        match self.status() {
            Status::Created => {}
            Status::Stopped => {
                return Err(Error::InvalidArgument(
                    "cannot start a container that has stopped".into(),
                ))
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "cannot start an already running container".into(),
                ))
            }
        }
        let fifo = self.store.dir(&self.record.id).join(EXEC_FIFO);
        let fd = nix::fcntl::open(
            &fifo,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .at("open", &fifo)?;
        // SAFETY: fd was just opened and is owned here.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let deadline = Instant::now() + Duration::from_millis(PROCESS_WAIT_MS);
        if let Err(e) = await_exec_fifo(&fd, &fifo, deadline, || self.record.process_alive()) {
            if matches!(e, Error::InvalidArgument(_)) {
                let _ = std::fs::remove_file(&fifo);
            }
            return Err(e);
        }
        std::fs::remove_file(&fifo).at("remove", &fifo)?;
        let hooks = self.record.spec.hooks().as_ref();
        // runc 1.1 hands poststart hooks the state it read before starting,
        // "created"; scripts written against it expect that.
        run_hooks(
            HookKind::Poststart,
            hooks.and_then(|h| h.poststart().as_ref()),
            &self.hook_state_json(Status::Created),
        )?;
        Ok(())
    }

    /// Send `signal` to the init, or to every process with `all`.
    pub fn kill(&self, signal: Signal, all: bool) -> Result<()> {
        let status = self.status();
        if status == Status::Stopped {
            return Err(Error::InvalidArgument("container not running".into()));
        }
        if all {
            for pid in self.record.cgroups.pids() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
        } else {
            sys(
                nix::sys::signal::kill(Pid::from_raw(self.record.pid), signal),
                "kill",
                self.record.pid,
            )?;
        }
        if status == Status::Paused && signal == Signal::SIGKILL {
            let _ = self.record.cgroups.set_frozen(false);
        }
        Ok(())
    }

    /// Freeze every process.
    pub fn pause(&self) -> Result<()> {
        match self.status() {
            Status::Running | Status::Created => self.record.cgroups.set_frozen(true),
            s => Err(Error::InvalidStatus {
                id: self.record.id.clone(),
                status: s.to_string(),
                op: "pause",
            }),
        }
    }

    /// Thaw a paused container.
    pub fn resume(&self) -> Result<()> {
        match self.status() {
            Status::Paused => self.record.cgroups.set_frozen(false),
            _ => Err(Error::InvalidArgument("container not paused".into())),
        }
    }

    /// Pids of every process in the container.
    pub fn pids(&self) -> Vec<i32> {
        self.record.cgroups.pids()
    }

    /// Resource statistics (`runc events --stats` data).
    pub fn stats(&self) -> serde_json::Value {
        self.record.cgroups.stats()
    }

    /// Remove the container; `force` kills a running one first.
    pub fn delete(self, force: bool) -> Result<()> {
        let status = self.status();
        match status {
            Status::Stopped | Status::Created => {}
            _ if force => {}
            s => {
                return Err(Error::InvalidArgument(format!(
                    "cannot delete container {} that is not stopped: {s}",
                    self.record.id
                )))
            }
        }
        if status != Status::Stopped {
            let cg = &self.record.cgroups;
            let _ = nix::sys::signal::kill(Pid::from_raw(self.record.pid), Signal::SIGKILL);
            for pid in cg.pids() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if status == Status::Paused {
                let _ = cg.set_frozen(false);
            }
        }
        // Reap the init if it is our child (run), then wait for the cgroup
        // to empty so it can be removed.
        let _ = waitpid(Pid::from_raw(self.record.pid), Some(WaitPidFlag::WNOHANG));
        let deadline = Instant::now() + Duration::from_millis(PROCESS_WAIT_MS);
        while self.record.process_alive() || !self.record.cgroups.pids().is_empty() {
            if Instant::now() > deadline {
                break;
            }
            let _ = waitpid(Pid::from_raw(self.record.pid), Some(WaitPidFlag::WNOHANG));
            std::thread::sleep(Duration::from_millis(1));
        }
        let hooks = self.record.spec.hooks().as_ref();
        let poststop = run_hooks(
            HookKind::Poststop,
            hooks.and_then(|h| h.poststop().as_ref()),
            &self.hook_state_json(Status::Stopped),
        );
        let cg = self.record.cgroups.destroy();
        self.store.remove(&self.record.id)?;
        cg?;
        if let Err(e) = poststop {
            tracing::warn!(container = %self.record.id, "{e}");
        }
        Ok(())
    }

    /// Start another process in the running container. Returns its pid;
    /// the caller waits for it (it is our child).
    pub fn exec(&self, opts: ExecOptions) -> Result<i32> {
        match self.status() {
            Status::Running | Status::Created => {}
            Status::Paused => {
                return Err(Error::InvalidArgument(
                    "cannot exec in a paused container".into(),
                ))
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "cannot exec in a stopped container".into(),
                ))
            }
        }
        let process = match opts.process {
            Some(p) => p,
            None => self
                .record
                .spec
                .process()
                .clone()
                .ok_or_else(|| Error::spec("process", "missing"))?,
        };
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(Error::spec("process.args", "must name a program to run"));
        }
        crate::capabilities::CapabilityMasks::from_spec(process.capabilities().as_ref())?;
        let terminal = process.terminal() == Some(true);
        if terminal && opts.console_socket.is_none() && opts.console_fd.is_none() {
            return Err(Error::InvalidArgument(
                "cannot allocate tty if runc will detach without setting console socket".into(),
            ));
        }
        let pid = self.record.pid;
        let mut namespaces = Vec::new();
        for typ in [
            LinuxNamespaceType::User,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Mount,
        ] {
            let theirs = format!("/proc/{pid}/ns/{}", proc_name(typ));
            let ours = format!("/proc/self/ns/{}", proc_name(typ));
            let (Ok(a), Ok(b)) = (std::fs::metadata(&theirs), std::fs::metadata(&ours)) else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            if a.ino() != b.ino() || a.dev() != b.dev() {
                let f = std::fs::File::open(&theirs).at("open", &theirs)?;
                namespaces.push((typ, OwnedFd::from(f)));
            }
        }
        let console: Option<OwnedFd> = match &opts.console_fd {
            Some(fd) => Some(fd.try_clone().at("dup", "console socket")?),
            None => opts
                .console_socket
                .as_deref()
                .map(crate::console::connect)
                .transpose()?,
        };
        let exec_init = init::ExecInit {
            process: &process,
            spec: &self.record.spec,
            namespaces,
            console_socket: console.as_ref().map(|c| c.as_raw_fd()),
            preserve_fds: opts.preserve_fds,
        };
        // SAFETY: prctl with integer arguments only; see create.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let (parent_end, child_end) = channel_pair()?;
        let stage1 = init::fork_exec(&exec_init, &parent_end, &child_end)?;
        drop(child_end);
        drop(console);
        let kill_stage1 = |e: Error| {
            let _ = nix::sys::signal::kill(Pid::from_raw(stage1), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(stage1), None);
            e
        };
        self.record.cgroups.join(stage1).map_err(kill_stage1)?;
        parent_end.send(&Message::Go).map_err(kill_stage1)?;
        let msg = parent_end
            .expect("joining the container")
            .map_err(kill_stage1)?;
        let _ = waitpid(Pid::from_raw(stage1), None);
        // The pid comes before anything the exec process says; see
        // init::fork_stage2.
        let Message::Stage2Pid(child) = msg else {
            return Err(Error::Init(format!("unexpected {msg:?} from exec init")));
        };
        // EOF means the exec succeeded (the channel is close-on-exec).
        match parent_end.recv() {
            Ok(None) => {}
            Ok(Some(Message::Error(e))) => {
                let _ = waitpid(Pid::from_raw(child), None);
                return Err(Error::Init(e));
            }
            Ok(Some(other)) => {
                return Err(Error::Init(format!(
                    "unexpected {other:?} from exec process"
                )))
            }
            Err(e) => return Err(e),
        }
        if let Some(p) = &opts.pid_file {
            write_pid_file(p, child)?;
        }
        Ok(child)
    }
}

/// The spec a container was created with (for callers building an exec
/// process from the container's defaults).
pub fn container_spec(c: &Container) -> &Spec {
    &c.record.spec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fifo in a fresh directory with `start`'s non-blocking read end and
    /// a write end standing in for the init's.
    fn fifo_pair(name: &str) -> (PathBuf, OwnedFd, std::fs::File) {
        let dir = std::env::temp_dir().join(format!("husk-fifo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join(EXEC_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let fd = nix::fcntl::open(
            &fifo,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        // SAFETY: fd was just opened and is owned here.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        (fifo, fd, writer)
    }

    /// The interleaving behind "cannot start a container that has stopped"
    /// for a container that did start: `start` reads nothing yet, then the
    /// init writes its byte, runs a short command and is gone before
    /// `start` checks on it. Forced here by having the liveness check do
    /// the write and report the init dead.
    #[test]
    fn an_init_that_wrote_its_byte_and_exited_before_the_check_has_started() {
        use std::io::Write;
        let (fifo, fd, writer) = fifo_pair("fast");
        let writer = std::cell::RefCell::new(Some(writer));
        let deadline = Instant::now() + Duration::from_secs(5);
        await_exec_fifo(&fd, &fifo, deadline, || {
            if let Some(mut w) = writer.borrow_mut().take() {
                w.write_all(b"0").unwrap();
            }
            false
        })
        .unwrap();
        let _ = std::fs::remove_dir_all(fifo.parent().unwrap());
    }

    /// And a dead init that never wrote is a stopped container.
    #[test]
    fn an_init_that_died_without_its_byte_is_stopped() {
        let (fifo, fd, writer) = fifo_pair("dead");
        drop(writer);
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = await_exec_fifo(&fd, &fifo, deadline, || false).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("has stopped"), "{err}");
        let _ = std::fs::remove_dir_all(fifo.parent().unwrap());
    }
}
