//! A confined thread that makes a call outside its allowlist: under
//! `kill` the whole process dies with SIGSYS; under `trap` the call fails
//! with ENOSYS and one line names the thread and the call. Each case runs
//! in a child process (this test binary, re-run with `CHILD_CASE` set),
//! because a kill must take a whole process with it.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use husk_confine::{confine_with, set_policy, Policy, ThreadClass, ViolationAction};

const CHILD_CASE: &str = "HUSK_CONFINE_CHILD_CASE";

/// Runs `case` in a child and returns its status and stderr.
fn run_child(case: &str) -> (std::process::ExitStatus, String) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_CASE, case)
        .output()
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The child's side: confines a thread as a device thread and makes it
/// call `mknodat`, which the device allowlist lacks.
#[test]
fn child_entry() {
    let Ok(case) = std::env::var(CHILD_CASE) else {
        return;
    };
    if case == "control" {
        control_child();
        return;
    }
    if case == "punch" {
        punch_child();
        return;
    }
    let action = match case.as_str() {
        "kill" => ViolationAction::Kill,
        "trap" => ViolationAction::Trap,
        other => panic!("unknown child case {other}"),
    };
    let policy = set_policy(Policy {
        seccomp: true,
        action,
        fs_private_root: false,
    });
    let opened = std::thread::Builder::new()
        .name("husk-test-dev".into())
        .spawn(move || {
            confine_with(ThreadClass::Device, policy).unwrap();
            // An open is refused with EACCES (glibc's malloc tries some).
            // SAFETY: a NUL-terminated literal path; the fd is closed below.
            let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            let open_errno = std::io::Error::last_os_error().raw_os_error();
            if fd >= 0 {
                // SAFETY: `fd` was just opened here.
                unsafe { libc::close(fd) };
            }
            assert_eq!(
                (fd, open_errno),
                (-1, Some(libc::EACCES)),
                "a device thread opened a file"
            );
            // SAFETY: a NUL-terminated literal path in a directory of the
            // test's own; FIFO creation is refused before it happens.
            let made = unsafe {
                libc::mknodat(
                    libc::AT_FDCWD,
                    c"/tmp/husk-confine-test-fifo".as_ptr(),
                    libc::S_IFIFO | 0o600,
                    0,
                )
            };
            (made, std::io::Error::last_os_error().raw_os_error())
        })
        .unwrap()
        .join()
        .unwrap();
    eprintln!("child: mknodat returned {:?}", opened);
    assert_eq!(opened, (-1, Some(libc::ENOSYS)));
}

#[test]
fn a_forbidden_call_kills_the_whole_process_with_sigsys() {
    let (status, stderr) = run_child("kill");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "the child was not killed by SIGSYS: {status:?}\n{stderr}"
    );
    assert!(
        !stderr.contains("child: open returned"),
        "the call returned: {stderr}"
    );
}

#[test]
fn a_forbidden_call_under_trap_fails_and_is_named_in_the_log() {
    let (status, stderr) = run_child("trap");
    assert!(status.success(), "child failed: {status:?}\n{stderr}");
    assert!(
        stderr.contains("husk: seccomp: thread husk-test-dev made system call mknodat (259)"),
        "no trap line naming the thread and the call:\n{stderr}"
    );
}

/// The "control" child: a thread that already runs when the process-wide
/// deny list is loaded from another thread gets it too (TSYNC), and its
/// `ptrace` then kills the process.
fn control_child() {
    let policy = set_policy(Policy {
        seccomp: true,
        action: ViolationAction::Kill,
        fs_private_root: false,
    });
    let (go_sender, go) = std::sync::mpsc::channel::<()>();
    let early = std::thread::Builder::new()
        .name("husk-test-early".into())
        .spawn(move || {
            go.recv().unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let seccomp = status
                .lines()
                .find_map(|line| line.strip_prefix("Seccomp:"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            eprintln!("child: the early thread has Seccomp {seccomp}");
            // SAFETY: PTRACE_TRACEME takes no pointers; the filter stops it.
            let traced = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            eprintln!("child: ptrace returned {traced}");
        })
        .unwrap();
    husk_confine::control::confine_process(policy).unwrap();
    go_sender.send(()).unwrap();
    early.join().unwrap();
}

#[test]
fn the_process_wide_deny_list_reaches_running_threads_and_kills_on_ptrace() {
    let (status, stderr) = run_child("control");
    assert!(
        stderr.contains("child: the early thread has Seccomp 2"),
        "a thread running before the load is not filtered:\n{stderr}"
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "ptrace under the deny list did not kill the process: {status:?}\n{stderr}"
    );
    assert!(!stderr.contains("child: ptrace returned"), "{stderr}");
}

/// The "punch" child: a device thread (under `trap`, so a refusal is an
/// ENOSYS and not a kill) may not use `fallocate` on a file it holds, not
/// even to punch a hole: the built-in VMM's guest memory is private, so
/// the virtio-balloon worker releases it with `madvise` alone, and a
/// compromised worker could otherwise punch holes in any file it holds.
fn punch_child() {
    let policy = set_policy(Policy {
        seccomp: true,
        action: ViolationAction::Trap,
        fs_private_root: false,
    });
    // SAFETY: a NUL-terminated literal name; the fd is owned below.
    let raw = unsafe { libc::memfd_create(c"husk-punch".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` was just created and nothing else owns it.
    let memfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let file = std::fs::File::from(memfd);
    file.set_len(1 << 20).unwrap();
    let results = std::thread::Builder::new()
        .name("husk-test-punch".into())
        .spawn(move || {
            confine_with(ThreadClass::Device, policy).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            let fallocate = |mode: libc::c_int, offset: libc::off_t| {
                // SAFETY: plain integer arguments on an fd this thread holds.
                let ret = unsafe { libc::fallocate(fd, mode, offset, 4096) };
                (ret, std::io::Error::last_os_error().raw_os_error())
            };
            let punched = fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0);
            let grown = fallocate(0, 1 << 20);
            (punched, grown)
        })
        .unwrap()
        .join()
        .unwrap();
    eprintln!(
        "child: punch returned {:?}, plain fallocate returned {:?}",
        results.0, results.1
    );
}

#[test]
fn a_device_thread_may_not_fallocate_not_even_to_punch_a_hole() {
    let (status, stderr) = run_child("punch");
    assert!(status.success(), "child failed: {status:?}\n{stderr}");
    assert!(
        stderr.contains(
            "child: punch returned (-1, Some(38)), plain fallocate returned (-1, Some(38))"
        ),
        "every fallocate of a device thread must fail with ENOSYS:\n{stderr}"
    );
    assert!(
        stderr.contains("husk: seccomp: thread husk-test-punch made system call fallocate (285)"),
        "the refused fallocate is not named in the log:\n{stderr}"
    );
}
