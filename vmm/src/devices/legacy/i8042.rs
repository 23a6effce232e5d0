//! The i8042 keyboard controller, reduced to what a microVM needs: the
//! guest's CPU-reset command (0xFE to port 0x64) signals the VMM's reset
//! event, which ends the VM cleanly. Everything else reads as 0.

use super::EventFdTrigger;
use husk_devices::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_PORT_OFFSET: u64 = 4;

/// The controller, on ports 0x60..=0x64.
pub struct I8042 {
    controller: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset_event` on the CPU-reset command.
    pub fn new(reset_event: EventFdTrigger) -> Self {
        Self {
            controller: vm_superio::I8042Device::new(reset_event),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status reads 0: input buffer empty, so the kernel's reset path
        // never waits on us.
        let value = match u8::try_from(offset) {
            Ok(offset) => self.controller.read(offset),
            Err(_) => 0,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != COMMAND_PORT_OFFSET {
            return;
        }
        if let [value] = data {
            if let Err(error) = self.controller.write(offset as u8, *value) {
                tracing::error!(%error, "i8042 could not signal the VM reset event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn cpu_reset_command_signals_the_reset_event() {
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(EventFdTrigger(event.try_clone().unwrap()));
        i8042.write(0, &[0xfe]);
        assert!(event.read().is_err(), "a data-port write must not reset");
        i8042.write(COMMAND_PORT_OFFSET, &[0xfe]);
        assert_eq!(event.read().unwrap(), 1);
    }
}
