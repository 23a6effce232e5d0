//! Setting up the container's process itself: rlimits, the oom score, the
//! user and groups, umask, environment, the executable's path lookup, and
//! the final `execve`.
//!
//! The user switch happens with PR_SET_KEEPCAPS so the capability sets of
//! the spec can be installed afterwards (see [`crate::capabilities`]).

use crate::capabilities::CapabilityMasks;
use crate::error::{sys, Context, Error, Result};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimitType, Process};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The libc resource number of an OCI rlimit type.
pub fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// Apply the spec's rlimits to the calling process.
pub fn apply_rlimits(process: &Process) -> Result<()> {
    for r in process.rlimits().iter().flatten() {
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: setrlimit with a valid struct.
        let rc = unsafe { libc::setrlimit(rlimit_resource(r.typ()), &lim) };
        if rc != 0 {
            return sys(
                Err(nix::errno::Errno::last()),
                "setrlimit",
                format!("{:?}", r.typ()),
            );
        }
    }
    Ok(())
}

/// Write `/proc/self/oom_score_adj`.
pub fn apply_oom_score_adj(process: &Process) -> Result<()> {
    if let Some(adj) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .at("write", "/proc/self/oom_score_adj")?;
    }
    Ok(())
}

/// Switch to the spec's user with its groups, then install capabilities.
pub fn switch_user(process: &Process, caps: &CapabilityMasks) -> Result<()> {
    let user = process.user();
    caps.apply_bounding()?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // setgroups is refused in a user namespace whose setgroups is "deny";
    // an empty list is then the only possible (and already true) answer.
    if let Err(e) = nix::unistd::setgroups(&groups) {
        if !groups.is_empty() {
            return sys(Err(e), "setgroups", format!("{:?}", user.additional_gids()));
        }
    }
    let gid = Gid::from_raw(user.gid());
    sys(
        nix::unistd::setresgid(gid, gid, gid),
        "setresgid",
        user.gid(),
    )?;
    let uid = Uid::from_raw(user.uid());
    sys(
        nix::unistd::setresuid(uid, uid, uid),
        "setresuid",
        user.uid(),
    )?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    caps.apply_process_sets()
}

/// Set `process.user.umask` (0022 when absent, like runc).
pub fn apply_umask(process: &Process) {
    let mask = process.user().umask().unwrap_or(0o022);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        mask as libc::mode_t,
    ));
}

/// The environment for the process: the spec's, plus HOME when missing
/// (from the container's /etc/passwd, else `/`), as runc does.
pub fn environment(process: &Process, passwd: Option<&str>) -> Vec<String> {
    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let uid = process.user().uid();
        let home = passwd
            .and_then(|text| {
                text.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid))
                        .then(|| f[5].to_string())
                })
            })
            .unwrap_or_else(|| "/".to_string());
        env.push(format!("HOME={home}"));
    }
    env
}

/// Find `arg0` the way `execvp` would with the container's `PATH`.
pub fn lookup_executable(arg0: &str, env: &[String]) -> Result<PathBuf> {
    let not_found = || {
        Error::Init(format!(
            "exec: \"{arg0}\": executable file not found in $PATH"
        ))
    };
    if arg0.contains('/') {
        let p = PathBuf::from(arg0);
        return match std::fs::metadata(&p) {
            Ok(m) if is_executable(&m) => Ok(p),
            Ok(_) => Err(Error::Init(format!("exec: \"{arg0}\": permission denied"))),
            Err(_) => Err(Error::Init(format!(
                "exec: \"{arg0}\": stat {arg0}: no such file or directory"
            ))),
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .ok_or_else(not_found)?;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(arg0);
        if let Ok(m) = std::fs::metadata(&candidate) {
            if m.is_file() && is_executable(&m) {
                return Ok(candidate);
            }
        }
    }
    Err(not_found())
}

fn is_executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.is_file() && m.permissions().mode() & 0o111 != 0
}

/// Replace the process image. Only returns on failure.
pub fn exec(path: &Path, args: &[String], env: &[String]) -> Error {
    let to_c = |s: &str| {
        CString::new(s).map_err(|_| Error::Init(format!("argument {s:?} contains a NUL byte")))
    };
    let prog = match CString::new(path.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(_) => return Error::Init("executable path contains a NUL byte".into()),
    };
    let argv: Result<Vec<CString>> = args.iter().map(|a| to_c(a)).collect();
    let envp: Result<Vec<CString>> = env.iter().map(|e| to_c(e)).collect();
    match (argv, envp) {
        (Ok(a), Ok(e)) => match nix::unistd::execve(&prog, &a, &e) {
            Err(errno) => Error::Init(format!("exec {}: {errno}", path.display())),
            Ok(never) => match never {},
        },
        (Err(e), _) | (_, Err(e)) => e,
    }
}

/// Give the process a clean signal state: nothing blocked, every
/// disposition default. The runtime may block signals it forwards, and Rust
/// ignores SIGPIPE; neither may leak into the container.
pub fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL has no handler to be unsafe about.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = SigSet::empty().thread_set_mask();
}

/// Mark every descriptor above 2 close-on-exec, except `keep_extra` fds
/// (3..3+keep_extra) handed to the process on purpose.
pub fn close_extra_fds_on_exec(keep_extra: i32) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    for fd in fds {
        if fd > 2 + keep_extra {
            // SAFETY: F_SETFD on an integer fd; a stale fd just fails.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Give stdio pipes to the container user so it can reopen /dev/stdout,
/// as runc does; /dev/null and terminals are left alone.
pub fn fix_stdio_ownership(uid: u32, gid: u32) {
    for fd in 0..3 {
        // SAFETY: `stat` is plain data; all-zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes at most one `stat` into `st`; a closed fd
        // only makes it fail.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            continue;
        }
        if (st.st_mode & libc::S_IFMT) == libc::S_IFCHR {
            continue;
        }
        if st.st_uid == uid && st.st_gid == gid {
            continue;
        }
        // SAFETY: fchown on an integer fd.
        unsafe { libc::fchown(fd, uid, gid) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn home_comes_from_passwd_then_defaults_to_root_dir() {
        let p = process(r#"{"cwd":"/","user":{"uid":1000,"gid":1000},"env":["A=1"]}"#);
        let pw = "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n";
        assert_eq!(environment(&p, Some(pw)), ["A=1", "HOME=/home/u"]);
        assert_eq!(environment(&p, None), ["A=1", "HOME=/"]);
        let p = process(r#"{"cwd":"/","user":{"uid":0,"gid":0},"env":["HOME=/x"]}"#);
        assert_eq!(environment(&p, Some(pw)), ["HOME=/x"]);
    }

    #[test]
    fn executable_lookup_uses_container_path_and_reports_missing() {
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(lookup_executable("sh", &env).unwrap(), Path::new("/bin/sh"));
        let e = lookup_executable("no-such-program", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
    }
}
