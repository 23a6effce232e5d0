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
//! Between fork and exec the child sets the signal, then checks that its
//! parent is still the shim; if the shim died in between (the signal was
//! set too late to fire), the child exits instead of running unowned.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// The name of the thread every VMM process is forked from.
pub const SPAWNER_THREAD: &str = "husk-vmm-spawner";

/// One command to start, and where its child goes.
struct SpawnRequest {
    command: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The spawner thread's queue, or why the thread could not start.
static SPAWNER: OnceLock<Result<Mutex<mpsc::Sender<SpawnRequest>>, String>> = OnceLock::new();

/// Starts `command` from the spawner thread with the parent-death signal
/// set to SIGKILL; returns its child (reap it as usual, from any thread).
pub fn spawn_tied_to_shim(command: Command) -> io::Result<Child> {
    let queue = SPAWNER
        .get_or_init(start_spawner)
        .as_ref()
        .map_err(|reason| io::Error::other(reason.clone()))?;
    let (reply, child) = mpsc::sync_channel(1);
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(SpawnRequest { command, reply })
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
                let _ = request.reply.send(spawn_here(request.command));
            }
        })
        .map_err(|error| format!("cannot start the {SPAWNER_THREAD} thread: {error}"))?;
    Ok(Mutex::new(queue))
}

/// Forks `command` from the calling thread, with the parent-death signal.
fn spawn_here(mut command: Command) -> io::Result<Child> {
    // getpid(2) of the shim: the parent the child must find.
    let shim_pid = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only the
    // async-signal-safe prctl(2) and getppid(2); its errors allocate
    // nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The shim died before the signal was set: it never fires.
            if libc::getppid() != shim_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
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
            let child = spawn_tied_to_shim(sleeper()).unwrap();
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

    /// Not a test on its own: in the helper process started by
    /// `a_child_dies_with_the_shim`, spawns a sleeper, records its pid and
    /// exits without reaping it.
    #[test]
    fn spawner_helper_process() {
        let Some(pid_file) = std::env::var_os(HELPER_PID_FILE_ENV) else {
            return;
        };
        let child = spawn_tied_to_shim(sleeper()).unwrap();
        std::fs::write(&pid_file, child.id().to_string()).unwrap();
        std::mem::forget(child);
        std::process::exit(0);
    }

    #[test]
    fn a_child_dies_with_the_shim() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleeper.pid");
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "hypervisor::qemu::spawner::tests::spawner_helper_process",
                "--test-threads=1",
                "--quiet",
            ])
            .env(HELPER_PID_FILE_ENV, &pid_file)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
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
}
