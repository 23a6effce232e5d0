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
