//! Tells the VMM that the guest reached init, by writing the boot-timer
//! magic to its I/O port (see `husk_vmm::devices::boot_timer`). Under a VMM
//! without that device (QEMU) the write goes nowhere, harmlessly.

/// Must match `husk_vmm::devices::boot_timer::BOOT_TIMER_PORT`.
const BOOT_TIMER_PORT: u16 = 0x440;
/// Must match `husk_vmm::devices::boot_timer::BOOT_TIMER_MAGIC`.
const BOOT_TIMER_MAGIC: u8 = 0x7b;

/// Writes the magic once; failures only cost the measurement.
pub fn report_init_reached() {
    // SAFETY: ioperm grants this process access to one I/O port; it has no
    // memory-safety effect.
    if unsafe { libc::ioperm(u64::from(BOOT_TIMER_PORT), 1, 1) } != 0 {
        return;
    }
    // SAFETY: the port was just granted; an `out` to it cannot touch memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_TIMER_PORT, in("al") BOOT_TIMER_MAGIC, options(nomem, nostack, preserves_flags));
    }
    // Give the port back: nothing else in the guest may use it.
    // SAFETY: as above.
    unsafe { libc::ioperm(u64::from(BOOT_TIMER_PORT), 1, 0) };
}
