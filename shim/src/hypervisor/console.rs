//! The guest's serial console on the host, bounded. The guest decides how
//! much it prints, so the host keeps at most two files of
//! `console.max_bytes` each: `console.log`, and `console.log.1` with the
//! bytes before it ([`RotatingLog`]). Nothing the guest prints can make
//! the VM wait on the host either: producers (the built-in VMM's vCPU
//! thread, the thread reading QEMU's console socket) put bytes into a queue
//! of at most [`CONSOLE_QUEUE_BYTES`] and never block; one writer thread
//! per console moves them to the files. Bytes that find the queue full are
//! dropped, counted, and the log says where and how many
//! ([`ConsoleLog`]).
//!
//! After the VM ended, [`ConsoleLog::finish`] delivers what is queued, and
//! [`read_tail`] reads the last part of the console across both files (how
//! a guest ended is read from there).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `console.max_bytes` unless configured: the cap of each of the two
/// console files, so a pod keeps at most twice this much console on the
/// host.
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 1024 * 1024;

/// The smallest `console.max_bytes` accepted: below this a kernel panic's
/// report no longer fits in the two files.
pub const MIN_CONSOLE_MAX_BYTES: u64 = 16 * 1024;

/// The most console bytes that may wait between the guest and the files.
/// More than a boot prints at once; a guest printing faster than the host
/// writes loses the excess (counted), instead of growing host memory or
/// waiting.
pub const CONSOLE_QUEUE_BYTES: usize = 256 * 1024;

/// How much of the end of the console is read to tell how a guest ended
/// or to quote in an error: more than a kernel panic's report.
pub const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;

/// How much one read of QEMU's console socket takes.
const SOCKET_READ_BYTES: usize = 16 * 1024;

/// The file the bytes before `path`'s are rotated into: `<path>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    PathBuf::from(rotated)
}

/// The last `max_bytes` (at most) of the console whose current file is
/// `path`: the end of `<path>.1` followed by `path`. Missing files read as
/// empty.
pub fn read_tail(path: &Path, max_bytes: u64) -> Vec<u8> {
    let mut tail = read_file_tail(path, max_bytes);
    let wanted_before = max_bytes.saturating_sub(tail.len() as u64);
    if wanted_before > 0 {
        let mut before = read_file_tail(&rotated_path(path), wanted_before);
        before.append(&mut tail);
        tail = before;
    }
    tail
}

fn read_file_tail(path: &Path, max_bytes: u64) -> Vec<u8> {
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let length = file.metadata().map_or(0, |meta| meta.len());
    let start = length.saturating_sub(max_bytes);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_ok() {
        let _ = file.take(max_bytes).read_to_end(&mut bytes);
    }
    bytes
}

/// A log of at most two files of `max_bytes`: writes go to `path` until it
/// holds `max_bytes`; the next byte moves it to `<path>.1` (replacing the
/// older one) and starts `path` anew.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    /// Bytes in the current file.
    current_bytes: u64,
}

impl RotatingLog {
    /// Starts an empty log at `path` (truncating it, and removing a
    /// `<path>.1` left by an earlier VM).
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<Self> {
        if max_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a console log needs a cap above 0 bytes",
            ));
        }
        match std::fs::remove_file(rotated_path(path)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            file: open_new(path)?,
            current_bytes: 0,
        })
    }

    /// Appends `bytes`, rotating as often as the cap requires.
    pub fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.current_bytes >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.current_bytes).unwrap_or(usize::MAX);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            if let Err(error) = self.file.write_all(now) {
                // Part of `now` may have landed: count what the file holds,
                // so the cap still holds.
                self.current_bytes = self
                    .file
                    .metadata()
                    .map_or(self.max_bytes, |meta| meta.len());
                return Err(error);
            }
            self.current_bytes += now.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated_path(&self.path))?;
        self.file = open_new(&self.path)?;
        self.current_bytes = 0;
        Ok(())
    }
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// What a console saw over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleSummary {
    /// Bytes written to the files.
    pub written_bytes: u64,
    /// Bytes lost: the queue was full, the log was already finished, or a
    /// file write failed.
    pub dropped_bytes: u64,
    /// Whether everything queued reached the files before
    /// [`ConsoleLog::finish`] gave up waiting.
    pub drained: bool,
}

/// The queue between the producers and the writer thread.
#[derive(Debug, Default)]
struct Queue {
    pending: Vec<u8>,
    /// Dropped bytes the log does not mention yet.
    unreported_drops: u64,
    dropped_bytes: u64,
    written_bytes: u64,
    /// No more bytes are accepted; the writer ends once `pending` is empty.
    closed: bool,
    writer_finished: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive or the queue closes.
    work: Condvar,
    /// Signalled when the writer thread finished.
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues what fits of `bytes`, counts the rest as dropped. Never
    /// blocks beyond the queue's lock, which the writer holds only to swap
    /// buffers.
    fn offer(&self, bytes: &[u8]) {
        let mut queue = self.lock();
        if queue.closed {
            queue.dropped_bytes += bytes.len() as u64;
            return;
        }
        let was_empty = queue.pending.is_empty();
        let room = CONSOLE_QUEUE_BYTES.saturating_sub(queue.pending.len());
        let taken = room.min(bytes.len());
        queue.pending.extend_from_slice(&bytes[..taken]);
        let dropped = (bytes.len() - taken) as u64;
        queue.dropped_bytes += dropped;
        queue.unreported_drops += dropped;
        // The writer waits only while the queue is empty.
        if was_empty {
            self.work.notify_one();
        }
    }
}

/// A producer's handle on a [`ConsoleLog`]: `write` always accepts the
/// whole buffer at once and never blocks; what does not fit in the queue
/// is dropped and counted.
#[derive(Debug, Clone)]
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.offer(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A thread copying one stream (QEMU's console socket) into the log.
#[derive(Debug)]
struct StreamReader {
    /// A handle on the stream to shut it down if its peer never closes it.
    stream: UnixStream,
    thread: JoinHandle<()>,
}

/// A guest console going to a [`RotatingLog`] through a bounded queue and
/// a writer thread of its own; see the module documentation.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    readers: Vec<StreamReader>,
    summary: Option<ConsoleSummary>,
}

impl ConsoleLog {
    /// Starts an empty console log at `path` whose two files hold at most
    /// `max_bytes` each.
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let mut log = RotatingLog::create(path, max_bytes)?;
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("husk-console".into())
            .spawn(move || write_until_closed(&thread_shared, &mut log))?;
        Ok(Self {
            path: path.to_owned(),
            shared,
            writer: Some(writer),
            readers: Vec::new(),
            summary: None,
        })
    }

    /// The console's current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for a producer that writes the console itself.
    pub fn writer(&self) -> ConsoleWriter {
        ConsoleWriter {
            shared: self.shared.clone(),
        }
    }

    /// Copies everything `stream` carries into the log, on a thread of its
    /// own, until the peer closes it (or [`ConsoleLog::finish`] does).
    pub fn read_from(&mut self, stream: UnixStream) -> io::Result<()> {
        let handle = stream.try_clone()?;
        let mut writer = self.writer();
        let thread = std::thread::Builder::new()
            .name("husk-console-in".into())
            .spawn(move || copy_stream(stream, &mut writer))?;
        self.readers.push(StreamReader {
            stream: handle,
            thread,
        });
        Ok(())
    }

    /// Bytes dropped so far.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.lock().dropped_bytes
    }

    /// Ends the log: waits up to `patience` for the streams to end (their
    /// peer exited), then up to `patience` again for the queued bytes to
    /// reach the files. Bytes written after this are dropped. Returns the
    /// same summary every time.
    pub fn finish(&mut self, patience: Duration) -> ConsoleSummary {
        if let Some(summary) = self.summary {
            return summary;
        }
        let deadline = Instant::now() + patience;
        for reader in self.readers.drain(..) {
            while !reader.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            // A peer that still holds the stream open loses it here, which
            // also ends the thread's read.
            let _ = reader.stream.shutdown(std::net::Shutdown::Both);
            if reader.thread.is_finished() {
                let _ = reader.thread.join();
            }
        }
        let deadline = Instant::now() + patience;
        let mut queue = self.shared.lock();
        queue.closed = true;
        self.shared.work.notify_one();
        while !queue.writer_finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = self
                .shared
                .finished
                .wait_timeout(queue, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let summary = ConsoleSummary {
            written_bytes: queue.written_bytes,
            dropped_bytes: queue.dropped_bytes,
            drained: queue.writer_finished,
        };
        let writer_finished = queue.writer_finished;
        drop(queue);
        if writer_finished {
            if let Some(writer) = self.writer.take() {
                let _ = writer.join();
            }
        }
        if summary.dropped_bytes > 0 || !summary.drained {
            tracing::warn!(
                console = %self.path.display(),
                written_bytes = summary.written_bytes,
                dropped_bytes = summary.dropped_bytes,
                drained = summary.drained,
                "the guest console lost bytes"
            );
        }
        self.summary = Some(summary);
        summary
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(1));
    }
}

/// The writer thread: moves queued bytes to `log` until the queue closes
/// and is empty. A write that fails loses its bytes (counted); the first
/// failure is logged.
fn write_until_closed(shared: &Shared, log: &mut RotatingLog) {
    let mut batch = Vec::with_capacity(CONSOLE_QUEUE_BYTES);
    let mut failures = 0u64;
    loop {
        let drops = {
            let mut queue = shared.lock();
            while queue.pending.is_empty() && queue.unreported_drops == 0 && !queue.closed {
                queue = shared
                    .work
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if queue.pending.is_empty() && queue.unreported_drops == 0 {
                queue.writer_finished = true;
                shared.finished.notify_all();
                return;
            }
            std::mem::swap(&mut queue.pending, &mut batch);
            std::mem::take(&mut queue.unreported_drops)
        };
        // The dropped bytes came after the queued ones: the queue was full.
        let mut result = log.append(&batch);
        if drops > 0 && result.is_ok() {
            let marker = format!(
                "\n[husk: {drops} console bytes dropped: the guest printed faster than the host logs]\n"
            );
            result = log.append(marker.as_bytes());
        }
        let mut queue = shared.lock();
        match result {
            Ok(()) => queue.written_bytes += batch.len() as u64,
            Err(error) => {
                queue.dropped_bytes += batch.len() as u64;
                failures += 1;
                if failures == 1 {
                    tracing::warn!(path = %log.path.display(), %error, "cannot write the guest console log; its bytes are dropped");
                }
            }
        }
        drop(queue);
        batch.clear();
    }
}

fn copy_stream(mut stream: UnixStream, writer: &mut ConsoleWriter) {
    let mut buffer = vec![0u8; SOCKET_READ_BYTES];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => {
                let _ = writer.write(&buffer[..read]);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::debug!(%error, "the console stream failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_default()
    }

    #[test]
    fn the_log_rotates_at_the_cap_and_keeps_two_files() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 10).unwrap();
        log.append(b"0123456").unwrap();
        assert_eq!(read(&path), b"0123456");
        assert!(!rotated_path(&path).exists());
        // Fills the first file to its cap exactly, then starts the next.
        log.append(b"789abc").unwrap();
        assert_eq!(read(&rotated_path(&path)), b"0123456789");
        assert_eq!(read(&path), b"abc");
        // One write spanning several caps keeps only the last two files.
        log.append(b"defghijklmnopqrstuvwxyz").unwrap();
        assert_eq!(read(&rotated_path(&path)), b"klmnopqrst");
        assert_eq!(read(&path), b"uvwxyz");
    }

    #[test]
    fn a_full_file_rotates_only_when_more_bytes_come() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 4).unwrap();
        log.append(b"abcd").unwrap();
        assert_eq!(read(&path), b"abcd");
        assert!(!rotated_path(&path).exists());
    }

    #[test]
    fn a_new_log_truncates_the_old_console_and_removes_its_rotation() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"old boot").unwrap();
        std::fs::write(rotated_path(&path), b"older boot").unwrap();
        let _log = RotatingLog::create(&path, 100).unwrap();
        assert_eq!(read(&path), b"");
        assert!(!rotated_path(&path).exists());
        assert!(RotatingLog::create(&path, 0).is_err());
    }

    #[test]
    fn the_tail_spans_the_rotated_file() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 8).unwrap();
        log.append(b"Kernel panic - not syncing").unwrap();
        // 26 bytes in files of 8: the last 8 + 2 are kept.
        assert_eq!(read(&rotated_path(&path)), b"ot synci");
        assert_eq!(read(&path), b"ng");
        assert_eq!(read_tail(&path, 100), b"ot syncing");
        assert_eq!(read_tail(&path, 6), b"yncing");
        assert_eq!(read_tail(&path, 2), b"ng");
        assert_eq!(read_tail(&dir.path().join("none.log"), 10), b"");
    }

    #[test]
    fn console_bytes_reach_the_file_through_the_writer_thread() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let mut console = ConsoleLog::create(&path, 1024).unwrap();
        let mut writer = console.writer();
        for byte in b"Linux version 6.12\n" {
            writer.write_all(&[*byte]).unwrap();
        }
        let summary = console.finish(Duration::from_secs(30));
        assert_eq!(
            summary,
            ConsoleSummary {
                written_bytes: 19,
                dropped_bytes: 0,
                drained: true
            }
        );
        assert_eq!(read(&path), b"Linux version 6.12\n");
        // Finished: later bytes are dropped and counted, and the summary
        // stays what it was.
        writer.write_all(b"late").unwrap();
        assert_eq!(console.dropped_bytes(), 4);
        assert_eq!(console.finish(Duration::ZERO), summary);
    }

    #[test]
    fn a_flood_beyond_the_queue_is_dropped_counted_and_marked() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let shared = Arc::new(Shared::default());
        let mut writer = ConsoleWriter {
            shared: shared.clone(),
        };
        // No writer thread yet: the queue fills and the rest is dropped,
        // without the producer waiting.
        let flood = vec![b'x'; CONSOLE_QUEUE_BYTES + 1000];
        assert_eq!(writer.write(&flood).unwrap(), flood.len());
        writer.write_all(b"more").unwrap();
        {
            let queue = shared.lock();
            assert_eq!(queue.pending.len(), CONSOLE_QUEUE_BYTES);
            assert_eq!(queue.dropped_bytes, 1004);
        }
        shared.lock().closed = true;
        let mut log = RotatingLog::create(&path, 4 * CONSOLE_QUEUE_BYTES as u64).unwrap();
        write_until_closed(&shared, &mut log);
        let text = String::from_utf8(read(&path)).unwrap();
        assert!(text.starts_with(&"x".repeat(CONSOLE_QUEUE_BYTES)));
        assert!(
            text.ends_with(
                "[husk: 1004 console bytes dropped: the guest printed faster than the host logs]\n"
            ),
            "{}",
            &text[CONSOLE_QUEUE_BYTES..]
        );
        let queue = shared.lock();
        assert_eq!(queue.written_bytes, CONSOLE_QUEUE_BYTES as u64);
        assert!(queue.writer_finished);
    }

    #[test]
    fn a_stream_is_copied_until_its_peer_closes_it() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let mut console = ConsoleLog::create(&path, 16 * 1024).unwrap();
        let (ours, mut guest) = UnixStream::pair().unwrap();
        console.read_from(ours).unwrap();
        let text = "[    0.000000] Linux version 6.12\n".repeat(1000);
        guest.write_all(text.as_bytes()).unwrap();
        drop(guest);
        let summary = console.finish(Duration::from_secs(30));
        assert!(summary.drained && summary.dropped_bytes == 0, "{summary:?}");
        let kept = [read(&rotated_path(&path)), read(&path)].concat();
        assert!(kept.len() <= 2 * 16 * 1024);
        assert!(text.as_bytes().ends_with(&kept));
        assert_eq!(read(&path).len() as u64, text.len() as u64 % (16 * 1024));
    }

    #[test]
    fn finishing_shuts_down_a_stream_whose_peer_keeps_it_open() {
        let dir = scratch();
        let path = dir.path().join("console.log");
        let mut console = ConsoleLog::create(&path, 1024).unwrap();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        console.read_from(ours).unwrap();
        peer.write_all(b"hello\n").unwrap();
        // Returns although the peer is still connected: the log took all
        // it will take.
        let summary = console.finish(Duration::from_millis(100));
        assert!(console.readers.is_empty());
        assert_eq!(console.finish(Duration::ZERO), summary);
        drop(peer);
    }
}
