//! Cleanup that works from paths alone: after a shim died (containerd's
//! `delete` action runs a fresh process) or when a boot failed half-way.
//! Kills the sandbox's VMM process if it is still there, unmounts whatever
//! is mounted below a directory (deepest first), and removes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::paths::SandboxPaths;

/// Kills the VMM recorded in the sandbox directory (only if that process
/// is still the one recorded, so a recycled pid is never hit), unmounts
/// everything below the directory and removes it.
pub fn remove_sandbox_dir(paths: &SandboxPaths) {
    if let Some(pid) = recorded_vmm_pid(paths) {
        kill_and_wait(pid, Duration::from_secs(5));
    }
    // A killed shim left its QEMU uid's lease file behind, unlocked.
    let stale = crate::hypervisor::qemu::identity::remove_stale_leases(
        &crate::hypervisor::qemu::identity::lease_directory(),
    );
    if stale > 0 {
        tracing::debug!(stale, "removed unheld QEMU uid lease files");
    }
    // The VMM is gone: the pod's cgroup can go (the shim moves out first).
    super::pod_cgroup::release_recorded(&paths.dir);
    if unmount_and_remove(&paths.dir) {
        tracing::info!(dir = %paths.dir.display(), "sandbox directory removed");
    }
    if unmount_and_remove(&paths.vm_dir) {
        tracing::debug!(dir = %paths.vm_dir.display(), "VM directory removed");
    }
}

/// Unmounts everything at or below `dir`, then removes it, but only if no
/// mount is left: a removal must never reach through a mount into a host
/// directory. Returns whether `dir` is gone.
pub fn unmount_and_remove(dir: &Path) -> bool {
    unmount_below(dir);
    let left = mounts_below(dir);
    if !left.is_empty() {
        tracing::error!(dir = %dir.display(), mounts = ?left, "mounts remain; not removing the directory");
        return false;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => true,
        Err(error) => {
            tracing::warn!(%error, dir = %dir.display(), "cannot remove the directory");
            false
        }
    }
}

/// What identifies the VMM process in its record: its pid and the time
/// it started (`/proc/<pid>/stat` field 22, clock ticks after boot).
/// Neither can the process change, unlike its command line, which a VMM
/// compromised by its guest could rewrite to hide from this cleanup.
pub fn vmm_record(pid: u32) -> std::io::Result<String> {
    let start = process_start_time(pid as i32).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {pid} has no start time in /proc"),
        )
    })?;
    Ok(format!("{pid} {start}"))
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`).
fn process_start_time(pid: i32) -> Option<u64> {
    stat_from_state(pid)?
        .split_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

/// `/proc/<pid>/stat` from field 3 (the state) on: what follows the
/// command, which may itself hold spaces and parentheses. `None` once
/// the process is gone.
fn stat_from_state(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.trim_start().to_owned())
}

/// The VMM pid recorded for the sandbox, if that process is still alive
/// and is the one recorded: same pid and same start time. A record of an
/// older shim (a pid alone) is trusted only if the process still names
/// the VM directory on its command line.
pub fn recorded_vmm_pid(paths: &SandboxPaths) -> Option<i32> {
    let text = std::fs::read_to_string(paths.vmm_pid_file()).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some(start) => {
            let recorded: u64 = start.parse().ok()?;
            (process_start_time(pid)? == recorded).then_some(pid)
        }
        None => {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline
                .contains(&*paths.vm_dir.to_string_lossy())
                .then_some(pid)
        }
    }
}

fn kill_and_wait(pid: i32, patience: Duration) {
    // SAFETY: plain kill(2) on a pid we verified belongs to the sandbox.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && started.elapsed() < patience {
        // A child of ours (same shim) must be reaped; others vanish alone.
        // SAFETY: waitpid with WNOHANG on a pid; harmless if not our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if is_zombie_or_gone(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(pid, "killed the sandbox's VMM process");
}

fn is_zombie_or_gone(pid: i32) -> bool {
    stat_from_state(pid).is_none_or(|rest| rest.starts_with('Z'))
}

/// Mount points at or below `dir`, deepest first (none if the mount
/// table cannot be read).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    match husk_mountinfo::read_self() {
        Ok(mounts) => husk_mountinfo::mount_points_below(&mounts, dir),
        Err(error) => {
            tracing::warn!(%error, "cannot read the mount table");
            Vec::new()
        }
    }
}

/// Detaches every mount at or below `dir` (stacked mounts included).
pub fn unmount_below(dir: &Path) {
    for _ in 0..8 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for point in mounts {
            let flags = nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW;
            if let Err(error) = nix::mount::umount2(&point, flags) {
                tracing::warn!(%error, mount = %point.display(), "cannot unmount");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_ascii_mount_below_the_directory_is_found_and_unmounted() {
        if !crate::testing::is_root() {
            println!("husk-test-form: cleanup mount test: not run: bind mounts need root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("share/ünïcödé dir/rootfs");
        let source = root.path().join("source");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&source).unwrap();
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert_eq!(mounts_below(root.path()), vec![target.clone()]);
        assert!(unmount_and_remove(&root.path().join("share")));
        assert!(mounts_below(root.path()).is_empty());
        assert!(source.is_dir(), "the bind source survives");
    }

    /// A `sleep` child and its record, as the QEMU backend writes it.
    fn recorded_sleeper(paths: &SandboxPaths) -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        std::fs::create_dir_all(&paths.vm_dir).unwrap();
        std::fs::write(paths.vmm_pid_file(), vmm_record(child.id()).unwrap()).unwrap();
        child
    }

    #[test]
    fn the_recorded_vmm_is_killed_whatever_its_command_line_says() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(&root.path().join("sandboxes"), &"a1".repeat(32));
        std::fs::create_dir_all(&paths.dir).unwrap();
        // `sleep 1000` does not name the VM directory: a VMM that rewrote
        // its command line looks like this.
        let mut child = recorded_sleeper(&paths);
        let pid = child.id() as i32;
        assert_eq!(recorded_vmm_pid(&paths), Some(pid));
        remove_sandbox_dir(&paths);
        // The cleanup reaps its own child; either way the sleeper is gone.
        let _ = child.try_wait();
        assert!(is_zombie_or_gone(pid), "the recorded VMM was killed");
        assert!(!paths.vm_dir.exists());
    }

    #[test]
    fn a_recorded_pid_whose_start_time_differs_is_never_killed() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(&root.path().join("sandboxes"), &"b2".repeat(32));
        let mut child = recorded_sleeper(&paths);
        // The same pid, started at another time: a recycled pid.
        let record = std::fs::read_to_string(paths.vmm_pid_file()).unwrap();
        let (pid, start) = record.split_once(' ').unwrap();
        let other = start.parse::<u64>().unwrap() + 1;
        std::fs::write(paths.vmm_pid_file(), format!("{pid} {other}")).unwrap();
        assert_eq!(recorded_vmm_pid(&paths), None);
        remove_sandbox_dir(&paths);
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process was spared"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_directory_without_mounts_is_simply_removed() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(&root.path().join("sandboxes"), "pod1");
        std::fs::create_dir_all(paths.share().join("c1")).unwrap();
        std::fs::create_dir_all(&paths.vm_dir).unwrap();
        std::fs::write(paths.vmm_pid_file(), "999999999").unwrap();
        remove_sandbox_dir(&paths);
        assert!(!paths.dir.exists());
        assert!(!paths.vm_dir.exists());
    }
}
