//! Capabilities per thread class: what each class keeps, and cutting the
//! calling thread's sets down to it.
//!
//! Capabilities are per thread in Linux, so a device thread can hold none
//! while the shim's RPC threads keep what mounting needs. The virtio-fs
//! workers keep exactly what a passthrough needs to act for the guest's
//! users (the list virtiofsd keeps in its sandbox); every other class keeps
//! nothing.

use crate::ThreadClass;

/// Capability numbers (linux/capability.h).
pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_FSETID: u32 = 4;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_MKNOD: u32 = 27;
pub const CAP_SETFCAP: u32 = 31;

/// What a virtio-fs worker keeps: ownership and mode changes, access
/// regardless of mode bits, acting as the guest's uid/gid, device nodes,
/// file capabilities (mapped to user xattrs by the share's xattr policy).
pub const FS_WORKER_CAPS: &[u32] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
    CAP_MKNOD,
    CAP_SETFCAP,
];

/// The capabilities `class` keeps.
pub fn kept_by(class: ThreadClass) -> &'static [u32] {
    match class {
        ThreadClass::FsWorker => FS_WORKER_CAPS,
        ThreadClass::Vcpu | ThreadClass::Device => &[],
    }
}

/// A capability set as a 64-bit mask.
pub fn mask_of(caps: &[u32]) -> u64 {
    caps.iter().fold(0u64, |mask, cap| mask | (1u64 << cap))
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted, inheritable) sets.
pub fn current_thread_sets() -> std::io::Result<(u64, u64, u64)> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) into `data`.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(40)
}

/// Cuts the calling thread's bounding, ambient, effective, permitted and
/// inheritable sets down to `keep` (never adds one it lacks).
pub fn restrict_current_thread(keep: &[u32]) -> std::io::Result<()> {
    let keep_mask = mask_of(keep);
    let (effective, permitted, inheritable) = current_thread_sets()?;
    // The bounding set first: dropping needs CAP_SETPCAP, which the capset
    // below removes. A thread without CAP_SETPCAP (a non-root test) keeps
    // its bounding set; its permitted set is cut all the same.
    if permitted & (1 << CAP_SETPCAP) != 0 {
        for cap in 0..=last_cap() {
            if keep_mask & (1u64 << cap) != 0 {
                continue;
            }
            // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                let error = std::io::Error::last_os_error();
                // EINVAL: a capability this kernel does not have.
                if error.raw_os_error() != Some(libc::EINVAL) {
                    return Err(error);
                }
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let split = |mask: u64| (mask as u32, (mask >> 32) as u32);
    let (effective_low, effective_high) = split(effective & keep_mask);
    let (permitted_low, permitted_high) = split(permitted & keep_mask);
    let (inheritable_low, inheritable_high) = split(inheritable & keep_mask);
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: effective_low,
            permitted: permitted_low,
            inheritable: inheritable_low,
        },
        CapData {
            effective: effective_high,
            permitted: permitted_high,
            inheritable: inheritable_high,
        },
    ];
    // SAFETY: capset reads two CapData (version 3) from `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_thread_keeps_only_its_list_and_others_keep_theirs() {
        let before = current_thread_sets().unwrap();
        let after = std::thread::spawn(|| {
            restrict_current_thread(&[CAP_CHOWN, CAP_SETUID]).unwrap();
            current_thread_sets().unwrap()
        })
        .join()
        .unwrap();
        let allowed = mask_of(&[CAP_CHOWN, CAP_SETUID]);
        assert_eq!(
            after.0 & !allowed,
            0,
            "effective beyond the list: {:#x}",
            after.0
        );
        assert_eq!(
            after.1 & !allowed,
            0,
            "permitted beyond the list: {:#x}",
            after.1
        );
        assert_eq!(after.1, before.1 & allowed);
        // Capabilities are per thread: this one is untouched.
        assert_eq!(current_thread_sets().unwrap(), before);
    }
}
