//! COM1 as a bus device: vm-superio's 8250 model, its interrupt wired to an
//! irqfd, its output to a host sink (a file, stdout, or any writer).

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::EventFdTrigger;
use husk_devices::BusDevice;

/// Where the guest console's bytes go.
pub enum SerialSink {
    /// Discard the output.
    Null,
    /// The VMM process's stdout.
    Stdout,
    /// Any writer: a log file, a pipe, or a shared buffer in tests.
    Writer(Box<dyn Write + Send>),
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialSink::Null => Ok(buf.len()),
            SerialSink::Stdout => std::io::stdout().write(buf),
            SerialSink::Writer(writer) => writer.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialSink::Null => Ok(()),
            SerialSink::Stdout => std::io::stdout().flush(),
            SerialSink::Writer(writer) => writer.flush(),
        }
    }
}

/// A byte sink shared between the VMM and a reader (tests, log tails).
#[derive(Clone, Default)]
pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest console UART.
pub struct SerialConsole {
    uart: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialSink>,
}

impl SerialConsole {
    /// A UART that raises its interrupt through `interrupt` (an irqfd).
    pub fn new(interrupt: EventFdTrigger, sink: SerialSink) -> Self {
        Self {
            uart: vm_superio::Serial::new(interrupt, sink),
        }
    }

    /// A UART with the registers a snapshot recorded.
    pub fn from_registers(
        registers: &SerialRegisters,
        interrupt: EventFdTrigger,
        sink: SerialSink,
    ) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: registers.baud_divisor_low,
            baud_divisor_high: registers.baud_divisor_high,
            interrupt_enable: registers.interrupt_enable,
            interrupt_identification: registers.interrupt_identification,
            line_control: registers.line_control,
            line_status: registers.line_status,
            modem_control: registers.modem_control,
            modem_status: registers.modem_status,
            scratch: registers.scratch,
            in_buffer: registers.in_buffer.clone(),
        };
        vm_superio::Serial::from_state(&state, interrupt, vm_superio::serial::NoEvents, sink)
            .map(|uart| Self { uart })
            .map_err(|error| format!("the saved 8250 registers are invalid: {error:?}"))
    }

    /// The UART's registers, for a snapshot.
    pub fn registers(&self) -> SerialRegisters {
        let state = self.uart.state();
        SerialRegisters {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        }
    }
}

/// The 8250's registers and unread input, as a snapshot keeps them
/// (`vm_superio`'s `SerialState`, which has no serde form).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failed host write loses console bytes but must not stop the
            // guest; the sink's owner sees its own error.
            if let Err(error) = self.uart.write(offset, *byte) {
                tracing::warn!(%error, "serial console write failed");
            }
        }
    }
}
