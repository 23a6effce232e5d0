//! The shim's record of one process (a container's init or an exec): its
//! lifecycle status, its exit, and the stdio plumbing. Any number of
//! `Wait` calls await the exit through a watch channel; the exit is
//! recorded once, whoever sees it first (the agent's `WaitProcess`, or the
//! VM's end).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::types::task::Status;
use tokio::sync::watch;

use crate::stdio::{ProcessIo, StdioRequest};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The code, or 128 + the signal.
    pub status: u32,
    pub at_unix_ns: i64,
}

impl Exit {
    pub fn now(status: u32) -> Self {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        Self {
            status,
            at_unix_ns: at,
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        let mut ts = Timestamp::new();
        ts.seconds = self.at_unix_ns.div_euclid(1_000_000_000);
        ts.nanos = self.at_unix_ns.rem_euclid(1_000_000_000) as i32;
        ts
    }
}

/// Lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Lifecycle {
    pub fn status(self) -> Status {
        match self {
            Lifecycle::Created => Status::CREATED,
            Lifecycle::Running => Status::RUNNING,
            Lifecycle::Paused => Status::PAUSED,
            Lifecycle::Stopped => Status::STOPPED,
        }
    }
}

/// One process.
pub struct Process {
    pub container_id: String,
    /// Empty for a container's init.
    pub exec_id: String,
    pub stdio: StdioRequest,
    /// For an exec: the OCI process JSON, sent to the agent at `Start`.
    pub exec_spec_json: Vec<u8>,
    state: Mutex<State>,
    exit_tx: watch::Sender<Option<Exit>>,
    /// The host end of the stdio, once connected.
    pub io: tokio::sync::Mutex<Option<ProcessIo>>,
}

struct State {
    lifecycle: Lifecycle,
    guest_pid: u32,
    exit: Option<Exit>,
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioRequest,
        exec_spec_json: Vec<u8>,
    ) -> Self {
        let (exit_tx, _) = watch::channel(None);
        Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            exec_spec_json,
            state: Mutex::new(State {
                lifecycle: Lifecycle::Created,
                guest_pid: 0,
                exit: None,
            }),
            exit_tx,
            io: tokio::sync::Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.state().lifecycle
    }

    pub fn guest_pid(&self) -> u32 {
        self.state().guest_pid
    }

    pub fn exit(&self) -> Option<Exit> {
        self.state().exit
    }

    /// Marks the process running with its guest pid (unless it already
    /// exited: a fast process can end before `Start` returns).
    pub fn set_running(&self, guest_pid: u32) {
        let mut state = self.state();
        state.guest_pid = guest_pid;
        if state.lifecycle != Lifecycle::Stopped {
            state.lifecycle = Lifecycle::Running;
        }
    }

    pub fn set_paused(&self, paused: bool) {
        let mut state = self.state();
        match (state.lifecycle, paused) {
            (Lifecycle::Running, true) => state.lifecycle = Lifecycle::Paused,
            (Lifecycle::Paused, false) => state.lifecycle = Lifecycle::Running,
            _ => {}
        }
    }

    /// Records the exit; returns false if an exit was already recorded.
    pub fn set_exited(&self, exit: Exit) -> bool {
        {
            let mut state = self.state();
            if state.exit.is_some() {
                return false;
            }
            state.exit = Some(exit);
            state.lifecycle = Lifecycle::Stopped;
        }
        self.exit_tx.send_replace(Some(exit));
        true
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the process record.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn several_waiters_all_see_the_one_exit() {
        let process = Arc::new(Process::new("c1", "", StdioRequest::default(), Vec::new()));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let process = process.clone();
                tokio::spawn(async move { process.wait().await })
            })
            .collect();
        process.set_running(7);
        assert!(process.set_exited(Exit::now(3)));
        assert!(
            !process.set_exited(Exit::now(255)),
            "only the first exit counts"
        );
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap().status, 3);
        }
        assert_eq!(process.lifecycle(), Lifecycle::Stopped);
        // A waiter arriving after the exit returns at once.
        assert_eq!(process.wait().await.status, 3);
    }

    #[test]
    fn timestamps_split_seconds_and_nanoseconds() {
        let exit = Exit {
            status: 0,
            at_unix_ns: 1_700_000_000_123_456_789,
        };
        let ts = exit.timestamp();
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_456_789));
    }

    #[test]
    fn a_process_that_exited_before_start_returned_stays_stopped() {
        let process = Process::new("c1", "", StdioRequest::default(), Vec::new());
        process.set_exited(Exit::now(0));
        process.set_running(9);
        assert_eq!(process.lifecycle(), Lifecycle::Stopped);
        assert_eq!(process.guest_pid(), 9);
    }
}
