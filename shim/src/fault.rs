//! Crash points for the fault tests: with `HUSK_FAULT_DIR` set in the
//! shim's environment, reaching step `S` of a Create while the file
//! `$HUSK_FAULT_DIR/kill-at-S` exists kills the shim on the spot (SIGKILL,
//! as an OOM killer or a node failure would), so the e2e tier can check
//! that containerd's cleanup (`shim delete`) leaves nothing after a death
//! at every step. Without the variable (production), a crash point is one
//! environment lookup.

use std::path::PathBuf;

/// Names the directory of trigger files; unset in production.
pub const FAULT_DIR_ENV: &str = "HUSK_FAULT_DIR";

/// The steps of a Create, in order, that have a crash point.
pub const CREATE_STEPS: &[&str] = &[
    "create-before-boot",
    "create-vm-booted",
    "create-rootfs-shared",
    "create-in-guest",
];

/// Kills the shim if the trigger file for `step` exists.
pub fn crash_point(step: &str) {
    let Some(dir) = std::env::var_os(FAULT_DIR_ENV) else {
        return;
    };
    if PathBuf::from(dir).join(format!("kill-at-{step}")).exists() {
        tracing::warn!(step, "fault test: the shim kills itself here");
        // SAFETY: raising SIGKILL on ourselves has no memory effects.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}
