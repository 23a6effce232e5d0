//! `seccomp_action = "trap"`: a call outside a thread's allowlist raises
//! SIGSYS instead of killing the shim. The handler writes one line naming
//! the thread and the call to the log fd, and makes the call fail with
//! ENOSYS, so a missing entry is found from the log without losing the pod.
//!
//! The handler is async-signal-safe: it formats into a stack buffer, looks
//! the call's name up in a table filled before any filter is loaded, and
//! uses only write(2) and prctl(PR_GET_NAME), both in every allowlist.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Where trap lines go (stderr until the shim names its log).
static LOG_FD: AtomicI32 = AtomicI32::new(2);

/// At most this many trap lines per process: a guest that can make a
/// device thread repeat a trapped call must not flood containerd's log.
/// The line after the last says that later traps are not logged.
pub const MAX_TRAP_LINES: u64 = 64;

/// Traps so far (64 bits: it never wraps back under the cap).
static TRAP_LINES: AtomicU64 = AtomicU64::new(0);

/// Whether the `n`-th trap (0-based) gets a line, and whether it is the
/// last one that does.
fn trap_line_budget(n: u64) -> (bool, bool) {
    (n < MAX_TRAP_LINES, n + 1 == MAX_TRAP_LINES)
}

/// System call names by number, filled before the handler is installed.
static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();

/// Sends trap lines to `fd` (the shim's log).
pub fn set_log_fd(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64.
const SI_SYSCALL_OFFSET: usize = 24;

pub(crate) fn install_handler() {
    NAMES.get_or_init(|| {
        let mut names: Vec<&'static str> = Vec::new();
        for name in husk_runtime::seccomp::native_syscall_names() {
            if let husk_runtime::seccomp::SyscallLookup::Native(number) =
                husk_runtime::seccomp::syscall_number(name)
            {
                let number = number as usize;
                if names.len() <= number {
                    names.resize(number + 1, "?");
                }
                names[number] = name;
            }
        }
        names
    });
    // SAFETY: the handler is async-signal-safe (see the module doc) and the
    // sigaction struct is fully initialised before the call.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            tracing::error!(
                error = %std::io::Error::last_os_error(),
                "cannot install the seccomp trap handler: a trapped call will kill the shim"
            );
        }
    }
}

/// A fixed-size line buffer; overflow truncates.
struct Line {
    bytes: [u8; 384],
    len: usize,
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        for &byte in text {
            if self.len == self.bytes.len() {
                return;
            }
            self.bytes[self.len] = byte;
            self.len += 1;
        }
    }

    fn push_number(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut count = 0;
        loop {
            digits[count] = b'0' + (value % 10) as u8;
            count += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        digits[..count].reverse();
        self.push(&digits[..count]);
    }
}

/// Formats the trap line for `number` made by thread `thread`.
fn trap_line(thread: &[u8], number: i32, name: &str) -> Line {
    let mut line = Line {
        bytes: [0; 384],
        len: 0,
    };
    line.push(b"husk: seccomp: thread ");
    line.push(thread);
    line.push(b" made system call ");
    line.push(name.as_bytes());
    line.push(b" (");
    line.push_number(number.max(0) as u64);
    line.push(
        b"), which its allowlist lacks; the call failed with ENOSYS (seccomp_action = \"trap\")\n",
    );
    line
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: for SIGSYS from seccomp the kernel fills the `_sigsys` member,
    // whose `_syscall` field is at SI_SYSCALL_OFFSET.
    let number = unsafe { *((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
    let name = NAMES
        .get()
        .and_then(|names| names.get(number as usize).copied())
        .unwrap_or("?");
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `comm`.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr(), 0, 0, 0) };
    let comm_len = comm
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(comm.len());
    let (logged, last) = trap_line_budget(TRAP_LINES.fetch_add(1, Ordering::Relaxed));
    let mut line = trap_line(&comm[..comm_len], number, name);
    if last {
        line.push(
            b"husk: seccomp: later trapped calls are not logged (confinement trap log cap)\n",
        );
    }
    if logged {
        // SAFETY: write(2) of a valid stack buffer; the result does not matter.
        unsafe {
            libc::write(
                LOG_FD.load(Ordering::Relaxed),
                line.bytes.as_ptr() as *const libc::c_void,
                line.len,
            )
        };
    }

    // SAFETY: `context` is the ucontext_t of the trapped thread; setting its
    // RAX makes the interrupted call return -ENOSYS.
    unsafe {
        let context = context as *mut libc::ucontext_t;
        (*context).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::ENOSYS as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_lines_stop_at_the_cap_and_the_last_says_so() {
        assert_eq!(trap_line_budget(0), (true, false));
        assert_eq!(trap_line_budget(MAX_TRAP_LINES - 1), (true, true));
        assert_eq!(trap_line_budget(MAX_TRAP_LINES), (false, false));
        assert_eq!(trap_line_budget(u64::MAX - 1), (false, false));
    }

    #[test]
    fn the_trap_line_names_the_thread_and_the_call() {
        let line = trap_line(b"vhost-user-fs", 59, "execve");
        let text = std::str::from_utf8(&line.bytes[..line.len]).unwrap();
        assert_eq!(
            text,
            "husk: seccomp: thread vhost-user-fs made system call execve (59), which its allowlist lacks; the call failed with ENOSYS (seccomp_action = \"trap\")\n"
        );
    }
}
