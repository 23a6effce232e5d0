//! Test-only hooks a guest can reach, compiled only with the `test-hooks`
//! feature (never in a release build of the shim; `make test` builds a
//! separate shim binary with it for the e2e tier).
//!
//! A LOOKUP of [`FORBIDDEN_SYSCALL_NAME`] makes the serving virtio-fs thread
//! call `socket(AF_INET, …)`, which the fs class's allowlist lacks: under
//! the shim's confinement the kernel kills the whole shim with SIGSYS,
//! which is what the e2e tier proves a guest-reachable bug would meet.

use std::ffi::CStr;

/// The name whose LOOKUP triggers the forbidden call.
pub const FORBIDDEN_SYSCALL_NAME: &CStr = c".husk-test-forbidden-syscall";

/// Makes the forbidden call when `name` asks for it. Returns only if the
/// call was not stopped (no filter in force), after closing what it made,
/// with the error the guest then gets.
pub fn on_lookup(name: &CStr) -> Option<std::io::Error> {
    if name != FORBIDDEN_SYSCALL_NAME {
        return None;
    }
    // SAFETY: socket takes integer arguments only; a returned fd is closed
    // right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket and is ours.
        unsafe { libc::close(fd) };
    }
    tracing::error!(
        "test hook: socket(AF_INET) was not stopped by a seccomp filter (returned {fd})"
    );
    Some(std::io::Error::from_raw_os_error(libc::EIO))
}
