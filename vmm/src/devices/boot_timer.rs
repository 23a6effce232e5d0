//! The boot timer: an I/O port the guest's init writes to once it runs, so
//! the VMM can record how long the guest took to reach user space.
//!
//! The agent (PID 1) does `ioperm` + `outb(BOOT_TIMER_MAGIC, BOOT_TIMER_PORT)`
//! as its first act. The VMM logs the elapsed time since the VM was created
//! and keeps it for callers (`make bench`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_devices::BusDevice;

/// The port the guest writes to; unused by any PC device the guest knows.
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// The value that marks "init is running"; other values are ignored so a
/// stray probe of the port cannot fake the figure.
pub const BOOT_TIMER_MAGIC: u8 = 0x7b;

/// When the guest reported reaching init, shared with the VM's owner.
#[derive(Clone, Default)]
pub struct BootTiming(Arc<Mutex<Option<Duration>>>);

impl BootTiming {
    /// Time from VM creation to the guest's init, if it got there.
    pub fn init_reached_after(&self) -> Option<Duration> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The device on [`BOOT_TIMER_PORT`].
pub struct BootTimer {
    vm_created_at: Instant,
    timing: BootTiming,
}

impl BootTimer {
    /// A timer measuring from `vm_created_at`, publishing into `timing`.
    pub fn new(vm_created_at: Instant, timing: BootTiming) -> Self {
        Self {
            vm_created_at,
            timing,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let mut reached = self.timing.0.lock().unwrap_or_else(|p| p.into_inner());
        if reached.is_none() {
            let elapsed = self.vm_created_at.elapsed();
            tracing::info!(
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "guest reached init"
            );
            *reached = Some(elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_magic_write_is_recorded() {
        let timing = BootTiming::default();
        let mut timer = BootTimer::new(Instant::now(), timing.clone());
        timer.write(0, &[0x00]);
        assert_eq!(timing.init_reached_after(), None);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = timing
            .init_reached_after()
            .expect("magic write records the time");
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(timing.init_reached_after(), Some(first));
    }
}
