//! Reaping orphans: every process whose parent dies is re-parented to PID 1,
//! which must wait for it or it stays a zombie forever.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

/// Starts a thread that reaps every child of PID 1 as it exits.
pub fn spawn() {
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            match waitpid(None, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(_) => {}
                // ECHILD: no children now; wait a little before asking again.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        });
    if let Err(error) = spawned {
        crate::console::log(&format!("cannot start the reaper thread: {error}"));
    }
}
