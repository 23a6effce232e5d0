//! What confinement a running process's threads are under, read back from
//! `/proc/<pid>/task/<tid>/status` and `ns/mnt`: the facts `husk check` and
//! the tests show, not what the shim meant to do.

use std::path::Path;

use serde::Serialize;

/// One thread's confinement as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadState {
    pub tid: u32,
    /// The thread's name (`comm`).
    pub name: String,
    /// 0 none, 1 strict, 2 filter (`Seccomp:`).
    pub seccomp_mode: u32,
    /// Filters stacked on the thread (`Seccomp_filters:`).
    pub seccomp_filters: u32,
    /// Effective capabilities (`CapEff:`).
    pub cap_effective: u64,
    /// Permitted capabilities (`CapPrm:`).
    pub cap_permitted: u64,
    /// Bounding set (`CapBnd:`).
    pub cap_bounding: u64,
    pub no_new_privs: bool,
    /// The mount namespace, as `readlink ns/mnt` shows it (`mnt:[4026…]`).
    pub mount_namespace: String,
}

/// Every thread of process `pid`.
pub fn threads_of(pid: u32) -> std::io::Result<Vec<ThreadState>> {
    let task_dir = format!("/proc/{pid}/task");
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(&task_dir)? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        // A thread that ended between the listing and the read is skipped.
        if let Ok(state) = thread_state(&entry.path(), tid) {
            threads.push(state);
        }
    }
    threads.sort_by_key(|thread| thread.tid);
    Ok(threads)
}

fn thread_state(dir: &Path, tid: u32) -> std::io::Result<ThreadState> {
    let status = std::fs::read_to_string(dir.join("status"))?;
    let name = std::fs::read_to_string(dir.join("comm"))?
        .trim_end()
        .to_owned();
    let mount_namespace = std::fs::read_link(dir.join("ns/mnt"))?
        .to_string_lossy()
        .into_owned();
    Ok(parse_status(&status, tid, name, mount_namespace))
}

/// Reads the fields of a `status` file.
pub fn parse_status(status: &str, tid: u32, name: String, mount_namespace: String) -> ThreadState {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key).map(|rest| rest.trim().to_owned()))
            .unwrap_or_default()
    };
    let hex = |key: &str| u64::from_str_radix(&field(key), 16).unwrap_or(0);
    let decimal = |key: &str| field(key).parse().unwrap_or(0);
    ThreadState {
        tid,
        name,
        seccomp_mode: decimal("Seccomp:"),
        seccomp_filters: decimal("Seccomp_filters:"),
        cap_effective: hex("CapEff:"),
        cap_permitted: hex("CapPrm:"),
        cap_bounding: hex("CapBnd:"),
        no_new_privs: decimal("NoNewPrivs:") == 1,
        mount_namespace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{confine_with, Policy, ThreadClass, ViolationAction};

    #[test]
    fn status_fields_are_read() {
        let status = "Name:\tx\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\nCapEff:\t00000000800000db\nCapPrm:\t00000000800000db\nCapBnd:\t00000000800000db\n";
        let state = parse_status(status, 7, "x".into(), "mnt:[1]".into());
        assert_eq!(state.seccomp_mode, 2);
        assert_eq!(state.seccomp_filters, 1);
        assert_eq!(state.cap_effective, 0x8000_00db);
        assert!(state.no_new_privs);
    }

    #[test]
    fn a_confined_thread_reads_back_as_confined_and_its_siblings_do_not() {
        let (tid_sender, tid) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("confined-test".into())
            .spawn(move || {
                confine_with(
                    ThreadClass::Device,
                    Policy {
                        seccomp: true,
                        action: ViolationAction::Kill,
                        fs_private_root: false,
                    },
                )
                .unwrap();
                // SAFETY: gettid has no arguments and is in every allowlist.
                tid_sender.send(unsafe { libc::gettid() } as u32).unwrap();
                let _ = wait.recv();
            })
            .unwrap();
        let tid = tid.recv().unwrap();
        let threads = threads_of(std::process::id()).unwrap();
        let confined = threads.iter().find(|thread| thread.tid == tid).unwrap();
        assert_eq!(confined.name, "confined-test");
        assert_eq!(confined.seccomp_mode, 2);
        assert!(confined.no_new_privs);
        assert_eq!(confined.cap_effective, 0);
        // SAFETY: gettid has no arguments.
        let me = unsafe { libc::gettid() } as u32;
        let this = threads.iter().find(|thread| thread.tid == me).unwrap();
        assert_eq!(this.seccomp_mode, 0, "seccomp is per thread");
        done.send(()).unwrap();
        thread.join().unwrap();
    }
}
