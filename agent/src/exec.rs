//! `husk.exec=`: run one program from the initramfs with the console as its
//! stdio and report how it ended, for guest-tier tests and diagnostics.
//!
//! The report line `HUSK_EXEC_EXIT code=N` (or `signal=N`) is what the host
//! reads from the console; the agent then powers the VM off.

use std::process::Command;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Runs `program`, reaps every child (orphans included) until it exits, and
/// logs its exit on the console.
pub fn run_and_report(program: &str) {
    crate::console::log(&format!("running {program}"));
    let child = match Command::new(program)
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            crate::console::log(&format!(
                "HUSK_EXEC_EXIT error=cannot start {program}: {error}"
            ));
            return;
        }
    };
    let program_pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program_pid => {
                crate::console::log(&format!("HUSK_EXEC_EXIT code={code}"));
                return;
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == program_pid => {
                crate::console::log(&format!("HUSK_EXEC_EXIT signal={}", signal as i32));
                return;
            }
            Ok(_) => {} // an orphan, reaped
            Err(error) => {
                crate::console::log(&format!("HUSK_EXEC_EXIT error=wait failed: {error}"));
                return;
            }
        }
    }
}
