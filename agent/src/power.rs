//! Ending the VM: sync, then ask the kernel to reboot. With `reboot=k` on
//! the command line the kernel resets the CPU through the i8042, which the
//! husk VMM treats as a clean power-off.

use nix::sys::reboot::{reboot, RebootMode};

/// Powers the VM off; never returns.
pub fn power_off() -> ! {
    crate::console::log("powering off");
    nix::unistd::sync();
    let Err(error) = reboot(RebootMode::RB_AUTOBOOT);
    crate::console::log(&format!("reboot failed: {error}"));
    // PID 1 must not exit; if the reboot call failed, stop here.
    loop {
        std::thread::park();
    }
}
