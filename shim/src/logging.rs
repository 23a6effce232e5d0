//! The shim's log: `tracing` events written to the FIFO containerd reads
//! (`log` in the shim's working directory, the bundle) and shows in its own
//! log, or to stderr where there is no FIFO (the `start` and `delete`
//! actions, whose stderr containerd already captures). Events name the
//! sandbox and container they concern in their fields; `-debug` raises
//! the level to debug. Each event is exactly one line: line breaks inside
//! it are escaped, so guest-written text cannot forge log lines.
//!
//! The serving shim also keeps its own copy of the lines, since it runs
//! one pod: `shim.log` in the sandbox directory (`husk-ctl logs`), rotated
//! into `shim.log.1` at `shim_log_max_bytes`, as the console is, by one
//! writer thread (logging threads only queue, at most
//! [`POD_LOG_QUEUE_LINES`] lines). Lines
//! from before the sandbox directory exists wait in memory, at most
//! [`POD_LOG_PENDING_BYTES`] of them (the rest are counted and the count
//! is written first).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{Config, LogLevel};
use crate::hypervisor::console::RotatingLog;

/// Log bytes kept in memory until the pod's `shim.log` exists: more than
/// the lines of a Create before its boot.
pub const POD_LOG_PENDING_BYTES: usize = 64 * 1024;

/// Lines queued for the pod's log writer at most; more are dropped and
/// counted (a thread that logs never waits for the file).
pub const POD_LOG_QUEUE_LINES: usize = 1024;

/// The pod's copy of the shim's lines.
enum PodLog {
    /// Before [`keep_pod_log`]: lines held, and how many were dropped.
    Pending(Vec<u8>, u64),
    /// The writer thread's queue, and the lines dropped since its last
    /// note.
    Writer(SyncSender<Vec<u8>>, Arc<AtomicU64>),
}

static POD_LOG: Mutex<PodLog> = Mutex::new(PodLog::Pending(Vec::new(), 0));

/// Adds one line to the pod's copy (never logs itself). It only queues:
/// the file is written, and rotated, by the writer thread alone, because
/// the thread that logs may be a confined device or vCPU thread whose
/// seccomp allowlist has no `rename` or `open`.
fn tee(line: &[u8]) {
    match &mut *POD_LOG.lock().unwrap_or_else(|p| p.into_inner()) {
        PodLog::Pending(held, dropped) => {
            if held.len() + line.len() <= POD_LOG_PENDING_BYTES {
                held.extend_from_slice(line);
            } else {
                *dropped += 1;
            }
        }
        PodLog::Writer(queue, dropped) => {
            if queue.try_send(line.to_vec()).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// From now on the pod's lines go to `path` (and its `.1`), each file at
/// most `max_bytes`, written by a thread of their own; the lines held
/// until now are written first.
pub fn keep_pod_log(path: &std::path::Path, max_bytes: u64) -> std::io::Result<()> {
    let mut log = RotatingLog::create(path, max_bytes)?;
    let mut state = POD_LOG.lock().unwrap_or_else(|p| p.into_inner());
    if let PodLog::Pending(held, dropped) = &*state {
        if *dropped > 0 {
            log.append(
                format!("husk: {dropped} log lines from before the sandbox directory existed were not kept\n")
                    .as_bytes(),
            )?;
        }
        log.append(held)?;
    }
    let (queue, lines) = sync_channel::<Vec<u8>>(POD_LOG_QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = dropped.clone();
    std::thread::Builder::new()
        .name("husk-pod-log".into())
        .spawn(move || {
            for line in lines {
                let missed = counted.swap(0, Ordering::Relaxed);
                if missed > 0 {
                    let note = format!(
                        "husk: {missed} log lines were not kept (more than {POD_LOG_QUEUE_LINES} queued)\n"
                    );
                    let _ = log.append(note.as_bytes());
                }
                let _ = log.append(&line);
            }
        })?;
    *state = PodLog::Writer(queue, dropped);
    Ok(())
}

/// The FIFO containerd creates for a shim's log, in the shim's cwd.
const LOG_FIFO: &str = "log";

/// Where log lines go.
#[derive(Clone)]
struct SharedFile(Arc<Mutex<File>>);

/// One formatted event as exactly one line: every line break or carriage
/// return inside it (a guest-written string in a field, a console tail in
/// an error) is escaped, so nothing the guest sends can forge a line of
/// containerd's log. The event's own final newline stays.
fn one_line(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return std::borrow::Cow::Borrowed(event);
    }
    let mut out = Vec::with_capacity(event.len() + 16);
    for &byte in body {
        match byte {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
    if body.len() < event.len() {
        out.push(b'\n');
    }
    std::borrow::Cow::Owned(out)
}

impl std::io::Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // tracing's formatter hands over one whole event per call.
        let line = one_line(buf);
        tee(&line);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&line)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl<'a> MakeWriter<'a> for SharedFile {
    type Writer = SharedFile;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The configured level (best effort: a broken configuration is reported
/// at `Create`, where the user sees it).
fn configured_level(debug: bool) -> LevelFilter {
    if debug {
        return LevelFilter::DEBUG;
    }
    match Config::load(None) {
        Ok((config, _)) => match config.log_level {
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        },
        Err(_) => LevelFilter::INFO,
    }
}

/// Sets up logging for the serving shim: to containerd's log FIFO.
pub fn init_server(debug: bool) {
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(LOG_FIFO);
    let level = configured_level(debug);
    match fifo {
        Ok(file) => {
            // Blocking writes from here on: log lines are never dropped.
            clear_nonblocking(&file);
            // Seccomp trap lines (written from a signal handler) go to the
            // same log; the file stays open for the process's life.
            husk_confine::trap::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&file));
            let writer = SharedFile(Arc::new(Mutex::new(file)));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter(level))
                .with_ansi(false)
                .with_writer(writer)
                .try_init();
        }
        Err(_) => init_stderr(debug),
    }
}

/// Standard error, one line per event (see [`one_line`]).
struct OneLineStderr;

impl std::io::Write for OneLineStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(&one_line(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Sets up logging to stderr (the `start` and `delete` actions).
pub fn init_stderr(debug: bool) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(configured_level(debug)))
        .with_ansi(false)
        .with_writer(|| OneLineStderr)
        .try_init();
}

/// Log target of fuse-backend-rs (it logs through the `log` crate).
const FUSE_BACKEND_TARGET: &str = "fuse_backend_rs";
/// Log target of virtio-queue, which logs an error line for each
/// malformed ring it meets, as often as the guest offers one.
const VIRTIO_QUEUE_TARGET: &str = "virtio_queue";

/// `level` for husk's own events. fuse-backend-rs's and virtio-queue's
/// lines only at debug and trace: they log some errors once per guest
/// request (a GETATTR of an unknown node id, a malformed name, a ring
/// index out of range), outside the devices' rate-limited guest log, so
/// at the default level a guest could flood containerd's log through them.
fn filter(level: LevelFilter) -> tracing_subscriber::EnvFilter {
    let fuse = if level >= LevelFilter::DEBUG {
        level
    } else {
        LevelFilter::OFF
    };
    tracing_subscriber::EnvFilter::new(format!(
        "{level},{FUSE_BACKEND_TARGET}={fuse},{VIRTIO_QUEUE_TARGET}={fuse}"
    ))
}

fn clear_nonblocking(file: &File) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{filter, one_line};
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn fuse_backend_lines_are_off_unless_debugging() {
        let directives = |level| {
            let mut parts: Vec<String> = filter(level)
                .to_string()
                .split(',')
                .map(str::to_owned)
                .collect();
            parts.sort();
            parts
        };
        assert_eq!(
            directives(LevelFilter::INFO),
            ["fuse_backend_rs=off", "info", "virtio_queue=off"]
        );
        assert_eq!(
            directives(LevelFilter::DEBUG),
            ["debug", "fuse_backend_rs=debug", "virtio_queue=debug"]
        );
    }

    #[test]
    fn an_event_with_line_breaks_in_its_fields_stays_one_line() {
        let event = b"ERROR husk: boot failed console=\"ok\ntime=x level=error msg=forged\r\"\n";
        let line = one_line(event);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(
            line.ends_with(b"\\r\"\n"),
            "{:?}",
            String::from_utf8_lossy(&line)
        );
        assert!(String::from_utf8_lossy(&line).contains("ok\\ntime=x"));
        let plain = b"INFO husk: fine\n";
        assert_eq!(&*one_line(plain), plain);
    }
}
