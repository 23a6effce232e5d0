//! Reaping: every child of the agent, and every orphan re-parented to it
//! (it is PID 1 in the guest, a child subreaper in host test mode), is
//! waited for here, and the exit status of each process someone watches
//! (container inits, exec processes, runtime helpers) is handed to its
//! watcher.
//!
//! A process can exit before its pid is known to the agent (an exec that
//! fails at once): statuses nobody watches yet are kept briefly, and a
//! later [`Reaper::watch`] of that pid gets it immediately.
//!
//! [`spawn_blocking_reaper`] is the thread form for the boot path, before
//! the async agent runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::sync::oneshot;

/// How long an exit status nobody watches is kept for a late watcher; a
/// watcher registers within milliseconds of learning the pid, and older
/// entries would only risk matching a reused pid.
const UNCLAIMED_EXIT_TTL: Duration = Duration::from_secs(30);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The code, or 128 + signal, as a shell reports it.
    pub status: i32,
    /// When the agent reaped it.
    pub at: SystemTime,
}

impl Exit {
    fn from_wait(status: WaitStatus) -> Option<(i32, Self)> {
        let (pid, code) = match status {
            WaitStatus::Exited(pid, code) => (pid, code),
            WaitStatus::Signaled(pid, signal, _) => (pid, 128 + signal as i32),
            _ => return None,
        };
        Some((
            pid.as_raw(),
            Exit {
                status: code,
                at: SystemTime::now(),
            },
        ))
    }

    /// Unix time of the exit in nanoseconds.
    pub fn unix_ns(&self) -> i64 {
        self.at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

#[derive(Default)]
struct Table {
    watchers: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

/// The agent's reaper; clones share one table.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Starts reaping on every SIGCHLD. Call inside the tokio runtime,
    /// before the first child is spawned.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Self::default();
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Reaps every child that has exited so far.
    fn reap_all(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some((pid, exit)) = Exit::from_wait(status) {
                        self.deliver(pid, exit);
                    }
                }
            }
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        let mut table = self.lock();
        match table.watchers.remove(&pid) {
            Some(watcher) => {
                let _ = watcher.send(exit);
            }
            None => {
                let now = Instant::now();
                table
                    .unclaimed
                    .retain(|_, (_, seen)| now.duration_since(*seen) < UNCLAIMED_EXIT_TTL);
                table.unclaimed.insert(pid, (exit, now));
            }
        }
    }

    /// The exit of `pid`, delivered once it is reaped (or at once if it was
    /// reaped already).
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (sender, receiver) = oneshot::channel();
        let mut table = self.lock();
        match table.unclaimed.remove(&pid) {
            Some((exit, _)) => {
                let _ = sender.send(exit);
            }
            None => {
                table.watchers.insert(pid, sender);
            }
        }
        receiver
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned table only means a panic elsewhere; the data is plain.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts a thread that reaps every child as it exits (boot path, before
/// the async agent takes over).
pub fn spawn_blocking_reaper() {
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            match waitpid(None, Some(WaitPidFlag::__WALL)) {
                Ok(_) => {}
                // ECHILD: no children now; wait a little before asking again.
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        });
    if let Err(error) = spawned {
        crate::console::log(&format!("cannot start the reaper thread: {error}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn an_exit_reaped_before_the_watch_is_delivered_to_the_late_watcher() {
        let reaper = Reaper::default();
        let exit = Exit {
            status: 3,
            at: SystemTime::now(),
        };
        reaper.deliver(4242, exit);
        let mut receiver = reaper.watch(4242);
        assert_eq!(receiver.try_recv().unwrap(), exit);
    }

    #[test]
    fn signal_deaths_read_as_128_plus_the_signal() {
        let status = WaitStatus::Signaled(Pid::from_raw(7), nix::sys::signal::SIGKILL, false);
        let (pid, exit) = Exit::from_wait(status).unwrap();
        assert_eq!((pid, exit.status), (7, 137));
    }
}
