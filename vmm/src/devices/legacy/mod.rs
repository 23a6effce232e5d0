//! Legacy PC devices the guest kernel expects at fixed I/O ports: the 8250
//! UART on COM1 for the console, and the i8042 controller whose CPU-reset
//! command is how a guest without ACPI ends the VM (`reboot=k`).

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{SerialConsole, SerialRegisters, SerialSink, SharedBuffer};

use vmm_sys_util::eventfd::EventFd;

/// COM1: the guest console (`console=ttyS0`).
pub const COM1_PORT: u64 = 0x3f8;
/// The 8250 occupies eight consecutive ports.
pub const COM1_PORT_COUNT: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 data port (0x60) up to and including its command port (0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64 (0x61 is the speaker control, which reads as 0).
pub const I8042_PORT_COUNT: u64 = 5;

/// An eventfd used as a `vm_superio::Trigger`: for the UART it is an irqfd
/// that injects COM1's interrupt, for the i8042 the VM's reset event.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
