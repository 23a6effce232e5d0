//! The agent's log: `tracing` events go to the serial console (stderr of
//! PID 1) and into an in-memory ring that `ReadLog` serves to the host. The
//! ring keeps the newest [`LOG_RING_BYTES`]; offsets count every byte ever
//! logged, so a reader can tell when it fell behind.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes of log kept for `ReadLog` (a few thousand lines).
const LOG_RING_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Ring {
    data: VecDeque<u8>,
    /// Offset of `data[0]` in the whole log.
    start: u64,
}

static RING: OnceLock<Arc<Mutex<Ring>>> = OnceLock::new();

fn ring() -> &'static Arc<Mutex<Ring>> {
    RING.get_or_init(Arc::default)
}

fn append(bytes: &[u8]) {
    let mut ring = ring()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ring.data.extend(bytes);
    let excess = ring.data.len().saturating_sub(LOG_RING_BYTES);
    if excess > 0 {
        ring.data.drain(..excess);
        ring.start += excess as u64;
    }
}

/// Up to `max_bytes` of the log from `offset` (or from the oldest byte
/// kept, if `offset` is older); returns the bytes and the next offset.
pub fn read(offset: u64, max_bytes: usize) -> (Vec<u8>, u64) {
    let ring = ring()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let from = offset.max(ring.start);
    let skip = usize::try_from(from - ring.start).unwrap_or(usize::MAX);
    let data: Vec<u8> = ring
        .data
        .iter()
        .skip(skip)
        .take(max_bytes)
        .copied()
        .collect();
    let next = from + data.len() as u64;
    (data, next.max(from))
}

/// A writer that tees one log line to stderr and the ring.
pub struct TeeWriter;

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(buf);
        // The console is best effort: a write error must not stop logging.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the subscriber (`RUST_LOG` filters; `info` by default).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| TeeWriter)
        .try_init();
}

/// Puts a plain line (from `console::log`) into the ring as well.
pub fn record_plain_line(line: &str) {
    append(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_from_an_offset_returns_what_followed_it() {
        let (_, before) = read(0, usize::MAX);
        append(b"hello log\n");
        let (data, next) = read(before, 1024);
        assert!(String::from_utf8_lossy(&data).contains("hello log"));
        assert!(next >= before + 10);
    }
}
