//! Process rlimits of the shim: how many fds it may hold and how large a
//! file it may write, whatever the guest makes the device models do.
//!
//! A file-size limit raises SIGXFSZ, which would kill the shim by default;
//! it is ignored, so a write past the limit fails with EFBIG instead and the
//! guest sees the error.

/// The limits in force after [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub max_open_files: u64,
    pub max_file_bytes: u64,
}

/// Sets `RLIMIT_NOFILE` and `RLIMIT_FSIZE` (soft = hard) on the process,
/// never above the hard limit the shim was started with: limits only ever
/// tighten here (raising one needs CAP_SYS_RESOURCE, which a confined host
/// may not grant). Returns what is in force.
pub fn apply(max_open_files: u64, max_file_bytes: u64) -> std::io::Result<Applied> {
    let max_open_files = set(libc::RLIMIT_NOFILE, max_open_files)?;
    // SAFETY: ignoring a signal changes no memory.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let max_file_bytes = set(libc::RLIMIT_FSIZE, max_file_bytes)?;
    Ok(Applied {
        max_open_files,
        max_file_bytes,
    })
}

fn set(resource: libc::__rlimit_resource_t, wanted: u64) -> std::io::Result<u64> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let value = wanted.min(current.rlim_max);
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one initialised rlimit.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// The process's current soft limit for `resource`.
pub fn current(resource: libc::__rlimit_resource_t) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}
