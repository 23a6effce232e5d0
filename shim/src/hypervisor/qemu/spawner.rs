//! Starting a VMM process that dies with the shim: every QEMU is forked
//! with `PR_SET_PDEATHSIG(SIGKILL)`, so a shim that dies (even by SIGKILL)
//! takes its VM along instead of leaving a guest running that nothing
//! serves.
//!
//! The kernel sends the parent-death signal when the *thread* that forked
//! the child exits, not the process. The shim runs on tokio, whose blocking
//! pool retires idle threads: a QEMU forked from one of them would be
//! killed mid-pod. So every fork happens on one dedicated thread,
//! `husk-vmm-spawner`, started on first use and never ended: it lives as
//! long as the shim process. Callers hand it a [`Command`] over a channel
//! and get the [`Child`] back.
//!
//! Between fork and exec the child, in this order:
//! 1. takes the identity it was given ([`ChildSetup::identity`]):
//!    supplementary groups, then gid, then uid (real, effective and saved
//!    alike, so no way back to root), leaving it without capabilities;
//! 2. sets the parent-death signal. Order matters: the kernel clears the
//!    signal whenever a task's effective or file system uid or gid
//!    changes (`commit_creds`; prctl(2): "cleared upon changes to any of
//!    the following thread credentials"), so a signal set before step 1
//!    would be gone;
//! 3. checks that its parent is still the shim; if the shim died in
//!    between (the signal was set too late to fire), the child exits
//!    instead of running unowned;
//! 4. lets the fds it must inherit ([`ChildSetup::inherit_fds`]) survive
//!    exec: they were made close-on-exec, so no other child of the shim
//!    gets them, and are cleared of it in this child alone.
//!
//! Each step is a raw system call: async-signal-safe, and (unlike glibc's
//! set*id wrappers, which signal every thread of the process) about the
//! forked child alone.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// The name of the thread every VMM process is forked from.
pub const SPAWNER_THREAD: &str = "husk-vmm-spawner";

/// What the child does to itself between fork and exec, besides the
/// parent-death signal.
#[derive(Debug, Clone, Default)]
pub struct ChildSetup {
    /// `(uid, gid, supplementary groups)` to run as; `None` keeps the
    /// shim's.
    pub identity: Option<(u32, u32, Vec<u32>)>,
    /// Close-on-exec fds of the shim the child keeps open, under the same
    /// numbers. The caller keeps them open until the spawn returned.
    pub inherit_fds: Vec<RawFd>,
}

/// One command to start, and where its child goes.
struct SpawnRequest {
    command: Command,
    setup: ChildSetup,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The spawner thread's queue, or why the thread could not start.
static SPAWNER: OnceLock<Result<Mutex<mpsc::Sender<SpawnRequest>>, String>> = OnceLock::new();

/// Starts `command` from the spawner thread with the parent-death signal
/// set to SIGKILL, set up as `setup` says; returns its child (reap it as
/// usual, from any thread).
pub fn spawn_tied_to_shim(command: Command, setup: ChildSetup) -> io::Result<Child> {
    let queue = SPAWNER
        .get_or_init(start_spawner)
        .as_ref()
        .map_err(|reason| io::Error::other(reason.clone()))?;
    let (reply, child) = mpsc::sync_channel(1);
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(SpawnRequest {
            command,
            setup,
            reply,
        })
        .map_err(|_| io::Error::other(format!("the {SPAWNER_THREAD} thread is gone")))?;
    child
        .recv()
        .map_err(|_| io::Error::other(format!("the {SPAWNER_THREAD} thread did not answer")))?
}

fn start_spawner() -> Result<Mutex<mpsc::Sender<SpawnRequest>>, String> {
    let (queue, requests) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name(SPAWNER_THREAD.into())
        // The sender lives in a static, so this loop never ends: the
        // thread exits only with the process.
        .spawn(move || {
            for request in requests {
                let _ = request
                    .reply
                    .send(spawn_here(request.command, request.setup));
            }
        })
        .map_err(|error| format!("cannot start the {SPAWNER_THREAD} thread: {error}"))?;
    Ok(Mutex::new(queue))
}

/// Forks `command` from the calling thread, with the parent-death signal
/// and `setup` (see the module documentation for the order).
fn spawn_here(mut command: Command, setup: ChildSetup) -> io::Result<Child> {
    // getpid(2) of the shim: the parent the child must find.
    let shim_pid = std::process::id() as libc::pid_t;
    let ChildSetup {
        identity,
        inherit_fds,
    } = setup;
    // The fallback's bound, read before the fork (getrlimit is not needed
    // in the child).
    let fd_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1 << 20, |(soft, _)| soft.min(1 << 20)) as libc::c_int;
    // SAFETY: the closure runs between fork and exec and makes only raw
    // system calls (setgroups, setresgid, setresuid, prctl, getppid,
    // close_range, fcntl), all async-signal-safe, on data allocated before the fork;
    // its errors allocate nothing.
    unsafe {
        command.pre_exec(move || {
            let check = |result: libc::c_long| {
                if result < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            if let Some((uid, gid, groups)) = &identity {
                check(libc::syscall(
                    libc::SYS_setgroups,
                    groups.len(),
                    groups.as_ptr(),
                ))?;
                check(libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid))?;
                check(libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid))?;
            }
            // After the credentials: changing them clears the signal.
            check(libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            // The shim died before the signal was set: it never fires.
            if libc::getppid() != shim_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // Every other descriptor of the shim closes at exec, whatever
            // flag it was made with (an eventfd of a device server, say):
            // QEMU gets its listed fds and stdio, nothing else.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                // Before Linux 5.11: one fcntl per possible descriptor.
                for fd in 3..fd_limit {
                    libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            for &fd in &inherit_fds {
                check(libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, 0))?;
            }
            Ok(())
        });
    }
    command.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// Generous: the bound on how long the kernel may take to end a
    /// process, not an expectation of speed.
    const PATIENCE: Duration = Duration::from_secs(30);

    /// Set in the helper process of `a_child_dies_with_the_shim`: the file
    /// it writes its sleeper's pid to.
    const HELPER_PID_FILE_ENV: &str = "HUSK_SPAWNER_TEST_PID_FILE";

    /// Whether `pid` is a live (not zombie) `sleep 1000`.
    fn sleeper_alive(pid: u32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        // A zombie's command line reads empty.
        cmdline == b"sleep\x001000\x00"
    }

    fn sleeper() -> Command {
        let mut command = Command::new("sleep");
        command.arg("1000");
        command
    }

    #[test]
    fn the_child_outlives_the_thread_that_asked_for_it() {
        let (pid_tx, pid_rx) = mpsc::channel();
        let asker = std::thread::spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            let tid = unsafe { libc::gettid() };
            let child = spawn_tied_to_shim(sleeper(), ChildSetup::default()).unwrap();
            pid_tx.send((tid, child.id())).unwrap();
            child
        });
        let mut child = asker.join().unwrap();
        let (tid, pid) = pid_rx.recv().unwrap();
        // Once the asking thread is gone from /proc, the kernel has
        // reparented its children: a signal tied to it would have fired.
        let task = format!("/proc/self/task/{tid}");
        let started = Instant::now();
        while Path::new(&task).exists() && started.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!Path::new(&task).exists(), "thread {tid} did not end");
        assert!(sleeper_alive(pid), "the child died with the asking thread");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Set in the helper process: the uid (and gid) its sleeper runs as.
    const HELPER_UID_ENV: &str = "HUSK_SPAWNER_TEST_UID";

    /// An unprivileged id for the sleepers of these tests, far from the
    /// default QEMU range.
    const TEST_UID: u32 = 0x7500_0000;

    /// Not a test on its own: in the helper process started by
    /// `a_child_dies_with_the_shim`, spawns a sleeper (as the uid in
    /// [`HELPER_UID_ENV`] if set), records its pid and exits without
    /// reaping it.
    #[test]
    fn spawner_helper_process() {
        let Some(pid_file) = std::env::var_os(HELPER_PID_FILE_ENV) else {
            return;
        };
        let identity = std::env::var(HELPER_UID_ENV)
            .ok()
            .map(|uid| uid.parse::<u32>().unwrap())
            .map(|uid| (uid, uid, Vec::new()));
        let setup = ChildSetup {
            identity,
            inherit_fds: Vec::new(),
        };
        let child = spawn_tied_to_shim(sleeper(), setup).unwrap();
        std::fs::write(&pid_file, child.id().to_string()).unwrap();
        std::mem::forget(child);
        std::process::exit(0);
    }

    #[test]
    fn a_child_dies_with_the_shim() {
        a_child_dies_with_its_spawner(None);
    }

    /// The parent-death signal is set after the ids changed (a change of
    /// ids clears it), so an unprivileged child dies with the shim too.
    #[test]
    fn an_unprivileged_child_dies_with_the_shim() {
        if !crate::testing::is_root() {
            println!(
                "husk-test-form: spawner unprivileged child: not run: changing ids needs root"
            );
            return;
        }
        a_child_dies_with_its_spawner(Some(TEST_UID));
    }

    fn a_child_dies_with_its_spawner(uid: Option<u32>) {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleeper.pid");
        let mut helper = Command::new(std::env::current_exe().unwrap());
        helper
            .args([
                "--exact",
                "hypervisor::qemu::spawner::tests::spawner_helper_process",
                "--test-threads=1",
                "--quiet",
            ])
            .env(HELPER_PID_FILE_ENV, &pid_file)
            .stdout(std::process::Stdio::null());
        if let Some(uid) = uid {
            helper.env(HELPER_UID_ENV, uid.to_string());
        }
        let status = helper.status().unwrap();
        assert!(status.success(), "the helper process failed: {status}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .expect("the helper recorded its sleeper")
            .parse()
            .unwrap();
        let started = Instant::now();
        while sleeper_alive(pid) && started.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(10));
        }
        let alive = sleeper_alive(pid);
        if alive {
            // SAFETY: kill(2) of the sleeper this test made.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        assert!(!alive, "sleep {pid} outlived the process that spawned it");
    }

    #[test]
    fn the_child_runs_as_the_given_ids_without_groups_or_capabilities() {
        if !crate::testing::is_root() {
            println!("husk-test-form: spawner identity: not run: changing ids needs root");
            return;
        }
        let setup = ChildSetup {
            identity: Some((TEST_UID + 1, TEST_UID + 2, vec![TEST_UID + 3])),
            inherit_fds: Vec::new(),
        };
        let mut child = spawn_tied_to_shim(sleeper(), setup).unwrap();
        let pid = child.id();
        let started = Instant::now();
        // Until exec, /proc shows the fork: wait for the sleeper itself.
        while !sleeper_alive(pid) && started.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line[name.len()..]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let uid = (TEST_UID + 1).to_string();
        let gid = (TEST_UID + 2).to_string();
        assert_eq!(field("Uid:"), [uid.as_str(); 4].join(" "), "{status}");
        assert_eq!(field("Gid:"), [gid.as_str(); 4].join(" "), "{status}");
        assert_eq!(field("Groups:"), (TEST_UID + 3).to_string(), "{status}");
        for caps in ["CapEff:", "CapPrm:", "CapAmb:"] {
            assert_eq!(field(caps), "0000000000000000", "{caps} in {status}");
        }
    }

    #[test]
    fn only_the_listed_fds_reach_the_child() {
        let (listed_read, listed_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Made inheritable on purpose: a descriptor the shim forgot to
        // mark close-on-exec (an eventfd, say) must not reach QEMU either.
        let (other_read, other_write) = nix::unistd::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let listed = listed_write.as_raw_fd();
        let other = other_write.as_raw_fd();
        // Through /proc/self/fd, not `>&N`: dash takes only one digit
        // there, and with other tests' fds open these can be 10 or more.
        let mut command = Command::new("/bin/sh");
        command.args([
            "-c",
            &format!(
                "echo listed >/proc/self/fd/{listed}; echo other >/proc/self/fd/{other} 2>/dev/null; exit 0"
            ),
        ]);
        let setup = ChildSetup {
            identity: None,
            inherit_fds: vec![listed],
        };
        let mut child = spawn_tied_to_shim(command, setup).unwrap();
        drop(listed_write);
        drop(other_write);
        child.wait().unwrap();
        let mut listed_text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(listed_read), &mut listed_text)
            .unwrap();
        let mut other_text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(other_read), &mut other_text)
            .unwrap();
        assert_eq!(listed_text, "listed\n");
        assert_eq!(other_text, "", "an fd not listed reached the child");
    }
}
