//! Linux capabilities: names to numbers, and applying the five OCI sets
//! (bounding, effective, permitted, inheritable, ambient) to the calling
//! process with `prctl` and `capset`.
//!
//! The order matters and is the one the kernel forces: the bounding set is
//! reduced while the process still holds CAP_SETPCAP, the uid change happens
//! with PR_SET_KEEPCAPS so permitted survives it, then capset installs the
//! final effective/permitted/inheritable sets, and ambient capabilities are
//! raised last because they must be both permitted and inheritable.

use crate::error::{sys, Error, Result};
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

/// Kernel capability names (without the `CAP_` prefix) indexed by number.
const CAPABILITY_NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability given by name, with or without `CAP_`.
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITY_NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| i as u32)
}

/// The number of an oci-spec capability value.
pub fn number_of(cap: &Capability) -> Option<u32> {
    capability_number(&cap.to_string())
}

/// The highest capability the running kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or((CAPABILITY_NAMES.len() - 1) as u32)
}

/// A set as a 64-bit mask; unknown entries are an error naming `field`.
pub fn mask_of(set: Option<&Capabilities>, field: &str) -> Result<u64> {
    let mut mask = 0u64;
    for cap in set.into_iter().flatten() {
        let n = number_of(cap)
            .ok_or_else(|| Error::spec(field, format!("unknown capability {cap}")))?;
        mask |= 1 << n;
    }
    Ok(mask)
}

/// The five sets as masks, ready to apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilityMasks {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

impl CapabilityMasks {
    /// Convert the OCI capability sets, naming the field on failure.
    pub fn from_spec(caps: Option<&LinuxCapabilities>) -> Result<Self> {
        let Some(c) = caps else {
            return Ok(Self::default());
        };
        Ok(Self {
            bounding: mask_of(c.bounding().as_ref(), "process.capabilities.bounding")?,
            effective: mask_of(c.effective().as_ref(), "process.capabilities.effective")?,
            permitted: mask_of(c.permitted().as_ref(), "process.capabilities.permitted")?,
            inheritable: mask_of(c.inheritable().as_ref(), "process.capabilities.inheritable")?,
            ambient: mask_of(c.ambient().as_ref(), "process.capabilities.ambient")?,
        })
    }

    /// Drop every capability outside the bounding set. Needs CAP_SETPCAP.
    pub fn apply_bounding(&self) -> Result<()> {
        for cap in 0..=last_cap() {
            if self.bounding & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments only.
                let rc =
                    unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
                if rc != 0 {
                    return sys(
                        Err(nix::errno::Errno::last()),
                        "drop bounding capability",
                        cap_name(cap),
                    );
                }
            }
        }
        Ok(())
    }

    /// Install effective, permitted and inheritable with capset, then raise
    /// the ambient set.
    pub fn apply_process_sets(&self) -> Result<()> {
        capset(self.effective, self.permitted, self.inheritable)?;
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
        }
        for cap in 0..=last_cap() {
            if self.ambient & (1 << cap) != 0 {
                // SAFETY: prctl with integer arguments only.
                let rc = unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        cap as libc::c_ulong,
                        0,
                        0,
                    )
                };
                // runc ignores ambient capabilities the kernel refuses
                // (not in permitted+inheritable); so do we.
                let _ = rc;
            }
        }
        Ok(())
    }
}

/// The name (`CAP_…`) of capability number `cap`.
pub fn cap_name(cap: u32) -> String {
    CAPABILITY_NAMES
        .get(cap as usize)
        .map(|n| format!("CAP_{n}"))
        .unwrap_or_else(|| format!("capability {cap}"))
}

#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit data words per set.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<()> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapUserData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: inheritable as u32,
        },
        CapUserData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: header and data are valid, correctly sized kernel structures.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut _, data.as_ptr()) };
    if rc != 0 {
        return sys(
            Err(nix::errno::Errno::last()),
            "capset",
            "process capabilities",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_oci_capability_name_has_a_kernel_number() {
        for (i, name) in CAPABILITY_NAMES.iter().enumerate() {
            let cap: Capability = serde_json::from_str(&format!("\"CAP_{name}\"")).unwrap();
            assert_eq!(number_of(&cap), Some(i as u32), "{name}");
        }
    }

    #[test]
    fn capability_numbers_match_kernel_abi() {
        assert_eq!(capability_number("CAP_CHOWN"), Some(0));
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("cap_bpf"), Some(39));
        assert_eq!(capability_number("CAP_NOPE"), None);
    }
}
