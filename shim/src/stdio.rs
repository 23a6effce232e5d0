//! Stdio between containerd and a process in the guest. containerd names
//! each pipe as a FIFO path (or a `file://` / `binary://` URI for logging);
//! the guest end is one vsock stream per pipe to the agent's stdio port
//! (with a terminal, one stream carries the pty both ways).
//!
//! A `binary://` logging binary gets `timeouts.logger_ready_ms` to signal
//! that it is ready; past that it is killed and reaped, and the process is
//! not started.
//!
//! The stdin FIFO is opened read-write so that it never reports EOF on its
//! own: `CloseIO` is the end of stdin, as with runc's shim. Output copiers
//! run until the guest closes its end, and [`ProcessIo::wait_output`] lets
//! the exit path deliver every byte before containerd hears of the exit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use husk_agent_client::agent::StdioStreams;
use husk_agent_client::AgentClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// How long stdin stays open after CloseIO while the client still holds
/// the FIFO open.
const STDIN_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Distinguishes the streams one shim opens.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(0);

/// The stdio containerd asked for.
#[derive(Debug, Clone, Default)]
pub struct StdioRequest {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// How long a logging binary that was killed for not signalling readiness
/// may take to be reaped before Create stops waiting for it.
const LOGGER_REAP_PATIENCE: Duration = Duration::from_secs(5);

/// Identifies a process to a logging binary, and how long the binary may
/// take to be ready.
#[derive(Debug, Clone)]
pub struct LogIdentity {
    pub container_id: String,
    pub namespace: String,
    /// `timeouts.logger_ready_ms`.
    pub logger_ready_timeout: Duration,
}

/// The host side of a process's stdio, while it runs.
pub struct ProcessIo {
    stdin_close: Option<Arc<Notify>>,
    stdin_reader: Option<StdinReader>,
    output: Vec<JoinHandle<()>>,
    /// Logging binaries to reap after the output ended.
    loggers: Vec<std::process::Child>,
}

impl ProcessIo {
    /// Opens the guest streams and the host ends and starts copying.
    /// Returns the stream ids for the agent request.
    pub async fn connect(
        client: &AgentClient,
        request: &StdioRequest,
        identity: &LogIdentity,
    ) -> Result<(StdioStreams, ProcessIo)> {
        let mut streams = StdioStreams {
            terminal: request.terminal,
            ..Default::default()
        };
        let mut io = ProcessIo {
            stdin_close: None,
            stdin_reader: None,
            output: Vec::new(),
            loggers: Vec::new(),
        };
        let seq = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let (stdout_sink, stderr_sink) =
            open_output_sinks(request, identity, &mut io.loggers).await?;

        if request.terminal {
            let id = format!("s{seq}-tty");
            let stream = client
                .open_stdio(&id)
                .await
                .with_context(|| format!("cannot open the terminal stream {id}"))?;
            streams.stdout_id = id;
            let (read_half, write_half) = stream.into_split();
            if !request.stdin.is_empty() {
                let (reader, chunks) = StdinReader::start(&request.stdin)?;
                io.stdin_reader = Some(reader);
                let close = Arc::new(Notify::new());
                io.stdin_close = Some(close.clone());
                tokio::spawn(copy_stdin(chunks, write_half, close));
            }
            if let Some(sink) = stdout_sink {
                io.output.push(tokio::spawn(copy_output(read_half, sink)));
            }
            return Ok((streams, io));
        }

        if !request.stdin.is_empty() {
            let id = format!("s{seq}-in");
            let stream = client
                .open_stdio(&id)
                .await
                .with_context(|| format!("cannot open the stdin stream {id}"))?;
            streams.stdin_id = id;
            let (reader, chunks) = StdinReader::start(&request.stdin)?;
            io.stdin_reader = Some(reader);
            let close = Arc::new(Notify::new());
            io.stdin_close = Some(close.clone());
            let (_, write_half) = stream.into_split();
            tokio::spawn(copy_stdin(chunks, write_half, close));
        }
        for (kind, sink, slot) in [
            ("out", stdout_sink, &mut streams.stdout_id),
            ("err", stderr_sink, &mut streams.stderr_id),
        ] {
            let Some(sink) = sink else { continue };
            let id = format!("s{seq}-{kind}");
            let stream = client
                .open_stdio(&id)
                .await
                .with_context(|| format!("cannot open the std{kind} stream {id}"))?;
            *slot = id;
            io.output.push(tokio::spawn(copy_output(stream, sink)));
        }
        Ok((streams, io))
    }

    /// Ends stdin: what is already in the FIFO is delivered, then the guest
    /// sees EOF.
    pub fn close_stdin(&self) {
        if let Some(close) = &self.stdin_close {
            close.notify_one();
        }
    }

    /// Waits (up to `patience`) until the guest closed every output stream
    /// and all output reached containerd.
    pub async fn wait_output(&mut self, patience: Duration) {
        let copiers = std::mem::take(&mut self.output);
        let all = join_all(copiers);
        if tokio::time::timeout(patience, all).await.is_err() {
            tracing::warn!(
                ?patience,
                "process output still open after its exit; not waiting longer"
            );
        }
        for mut logger in self.loggers.drain(..) {
            let _ = tokio::task::spawn_blocking(move || logger.wait()).await;
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        if let Some(close) = &self.stdin_close {
            close.notify_one();
        }
        for copier in &self.output {
            copier.abort();
        }
        for logger in &mut self.loggers {
            let _ = logger.kill();
            let _ = logger.wait();
        }
    }
}

async fn join_all(handles: Vec<JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

async fn open_output_sinks(
    request: &StdioRequest,
    identity: &LogIdentity,
    loggers: &mut Vec<std::process::Child>,
) -> Result<(Option<Sink>, Option<Sink>)> {
    if request.stdout.starts_with("binary://") {
        let (stdout, stderr, child) = start_logging_binary(&request.stdout, identity).await?;
        loggers.push(child);
        let stderr = (!request.stderr.is_empty() && !request.terminal).then_some(stderr);
        return Ok((Some(stdout), stderr));
    }
    let stdout = open_sink(&request.stdout)?;
    let stderr = if request.terminal {
        None
    } else {
        open_sink(&request.stderr)?
    };
    Ok((stdout, stderr))
}

/// Opens one output destination: a FIFO path or `file://` URI.
fn open_sink(target: &str) -> Result<Option<Sink>> {
    if target.is_empty() {
        return Ok(None);
    }
    if let Some(path) = target.strip_prefix("file://") {
        let path = Path::new(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the log file {}", path.display()))?;
        return Ok(Some(Box::new(tokio::fs::File::from_std(file))));
    }
    if target.contains("://") && !target.starts_with("fifo://") {
        return Err(anyhow!(
            "unsupported stdio URI {target:?} (FIFO paths, file:// and binary:// are)"
        ));
    }
    let path = target.strip_prefix("fifo://").unwrap_or(target);
    // Read-write: opening never blocks or fails for want of a reader.
    let sender = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .with_context(|| format!("cannot open the output FIFO {path}"))?;
    Ok(Some(Box::new(sender)))
}

/// Reads the stdin FIFO on a thread of its own. The FIFO is opened
/// read-only and blocking: the open waits for the client's writer, and the
/// reads end with EOF when the client closes it, as with runc's shim.
/// Chunks travel to the async copier through a channel.
struct StdinReader {
    path: PathBuf,
    released: Arc<AtomicBool>,
}

impl StdinReader {
    fn start(path: &str) -> Result<(Self, mpsc::Receiver<Vec<u8>>)> {
        let path = PathBuf::from(path.strip_prefix("fifo://").unwrap_or(path));
        let metadata = std::fs::metadata(&path)
            .with_context(|| format!("cannot open the stdin FIFO {}", path.display()))?;
        if !metadata.file_type().is_fifo() {
            return Err(anyhow!("stdin {} is not a FIFO", path.display()));
        }
        let (tx, rx) = mpsc::channel(16);
        let released = Arc::new(AtomicBool::new(false));
        let (thread_path, thread_released) = (path.clone(), released.clone());
        std::thread::Builder::new()
            .name("husk-stdin".into())
            .spawn(move || {
                let Ok(mut fifo) = std::fs::File::open(&thread_path) else {
                    return;
                };
                let mut buffer = vec![0u8; 32 * 1024];
                while !thread_released.load(Ordering::Acquire) {
                    match std::io::Read::read(&mut fifo, &mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.blocking_send(buffer[..n].to_vec()).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .context("cannot start the stdin reader thread")?;
        Ok((Self { path, released }, rx))
    }
}

impl Drop for StdinReader {
    fn drop(&mut self) {
        self.released.store(true, Ordering::Release);
        // A reader still waiting in open() for a client that never came is
        // released by a writer that arrives and leaves at once.
        if let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
        {
            drop(file);
        }
    }
}

async fn copy_stdin(
    mut chunks: mpsc::Receiver<Vec<u8>>,
    mut stream: tokio::net::unix::OwnedWriteHalf,
    close: Arc<Notify>,
) {
    let mut forwarded = 0usize;
    let mut ended_by = "EOF";
    loop {
        tokio::select! {
            chunk = chunks.recv() => match chunk {
                Some(chunk) => {
                    forwarded += chunk.len();
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            _ = close.notified() => {
                // CloseIO comes right after the client closed its end of the
                // FIFO: what it wrote may still be in the pipe, so read on to
                // the reader's EOF. A client that keeps the FIFO open after
                // CloseIO gets its stdin closed after STDIN_CLOSE_GRACE.
                ended_by = "CloseIO";
                let drained = tokio::time::timeout(STDIN_CLOSE_GRACE, async {
                    while let Some(chunk) = chunks.recv().await {
                        forwarded += chunk.len();
                        if stream.write_all(&chunk).await.is_err() {
                            return false;
                        }
                    }
                    true
                })
                .await;
                if matches!(drained, Ok(false)) {
                    return;
                }
                break;
            }
        }
    }
    let _ = stream.shutdown().await;
    tracing::debug!(forwarded, ended_by, "stdin closed");
}

async fn copy_output(mut stream: impl AsyncRead + Unpin, mut sink: Sink) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => {
                if let Err(error) = sink.write_all(&buffer[..n]).await {
                    tracing::debug!(%error, "cannot deliver process output");
                    // Keep draining so the guest never blocks on a full stream.
                    while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
                    break;
                }
            }
            Err(error) => {
                tracing::debug!(%error, "process output stream failed");
                break;
            }
        }
    }
    let _ = sink.flush().await;
}

/// `binary:///path?k=v`: containerd's logging-binary protocol. The binary
/// gets the process's stdout as fd 3 and stderr as fd 4, and closes fd 5
/// when it is ready; `CONTAINER_ID` and `CONTAINER_NAMESPACE` name the
/// process. A binary that is not ready within
/// `identity.logger_ready_timeout` is killed and reaped, every pipe made
/// for it is closed, and the error names it and the setting.
async fn start_logging_binary(
    uri: &str,
    identity: &LogIdentity,
) -> Result<(Sink, Sink, std::process::Child)> {
    let rest = uri.trim_start_matches("binary://");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(percent_decode(key));
        if !value.is_empty() {
            args.push(percent_decode(value));
        }
    }
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (ready_read, ready_write) = pipe()?;
    let fds = [
        stdout_read.as_raw_fd(),
        stderr_read.as_raw_fd(),
        ready_write.as_raw_fd(),
    ];
    let mut command = std::process::Command::new(path);
    command
        .args(&args)
        .env("CONTAINER_ID", &identity.container_id)
        .env("CONTAINER_NAMESPACE", &identity.namespace)
        .stdin(std::process::Stdio::null());
    // SAFETY: only async-signal-safe dup2 calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            for (target, fd) in [3, 4, 5].into_iter().zip(fds) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start the logging binary {path}"))?;
    drop((stdout_read, stderr_read, ready_write));
    match wait_until_ready(ready_read, identity.logger_ready_timeout).await {
        Ok(()) => Ok((
            Box::new(tokio::fs::File::from_std(std::fs::File::from(stdout_write))),
            Box::new(tokio::fs::File::from_std(std::fs::File::from(stderr_write))),
            child,
        )),
        Err(reason) => {
            // The binary's ends of the output pipes close with it; ours
            // close here.
            drop((stdout_write, stderr_write));
            let pid = child.id();
            kill_and_reap(child).await;
            Err(anyhow!(
                "the logging binary {path} (pid {pid}) {reason}; it was killed \
                 (timeouts.logger_ready_ms = {} ms)",
                identity.logger_ready_timeout.as_millis()
            ))
        }
    }
}

/// Waits, without blocking a runtime thread, until the logging binary
/// closes (or writes to) its readiness pipe. Consumes and closes `ready`.
async fn wait_until_ready(ready: OwnedFd, timeout: Duration) -> std::result::Result<(), String> {
    let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready)
        .map_err(|error| format!("has a readiness pipe the runtime cannot watch ({error})"))?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(timeout, ready.read(&mut byte)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("left its readiness pipe unreadable ({error})")),
        Err(_) => Err(format!(
            "did not signal readiness (close fd 5) within {} ms",
            timeout.as_millis()
        )),
    }
}

/// SIGKILLs `child` and reaps it off the runtime's threads; gives up
/// waiting (leaving the reaping to the blocking thread) after
/// [`LOGGER_REAP_PATIENCE`].
async fn kill_and_reap(mut child: std::process::Child) {
    let pid = child.id();
    if let Err(error) = child.kill() {
        tracing::warn!(pid, %error, "cannot kill the logging binary");
    }
    let reaped = tokio::time::timeout(
        LOGGER_REAP_PATIENCE,
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await;
    if !matches!(reaped, Ok(Ok(Ok(_)))) {
        tracing::warn!(pid, "the killed logging binary was not reaped in time");
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both fds were just created and are owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let Ok(v) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake logging binary `name` in `dir` running `body` (after
    /// recording its pid in `<dir>/<name>.pid`).
    fn fake_logger(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        let pid_file = dir.join(format!("{name}.pid"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho $$ > '{}'\n{body}\n", pid_file.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn identity(timeout: Duration) -> LogIdentity {
        LogIdentity {
            container_id: "c1".to_owned(),
            namespace: "default".to_owned(),
            logger_ready_timeout: timeout,
        }
    }

    #[tokio::test]
    async fn a_logger_that_never_signals_readiness_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        // Keeps fd 5 open: never ready.
        let logger = fake_logger(dir.path(), "silent-logger", "exec sleep 1000");
        let uri = format!("binary://{}", logger.display());
        let error = match start_logging_binary(&uri, &identity(Duration::from_millis(200))).await {
            Ok(_) => panic!("a logger that is never ready was accepted"),
            Err(error) => format!("{error:#}"),
        };
        assert!(
            error.contains(&logger.display().to_string())
                && error.contains("timeouts.logger_ready_ms")
                && error.contains("200 ms"),
            "{error}"
        );
        let pid = std::fs::read_to_string(dir.path().join("silent-logger.pid")).unwrap();
        // Not even a zombie: reaped before the error came back.
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "logger {} is still there",
            pid.trim()
        );
    }

    #[tokio::test]
    async fn a_ready_logger_gets_the_output_and_the_process_identity() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("logged");
        let logger = fake_logger(
            dir.path(),
            "ready-logger",
            &format!(
                "exec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $1\" > '{0}'\ncat <&3 >> '{0}'",
                out.display()
            ),
        );
        let uri = format!("binary://{}?tag=web", logger.display());
        let (mut stdout, stderr, mut child) =
            start_logging_binary(&uri, &identity(Duration::from_secs(30)))
                .await
                .unwrap();
        stdout.write_all(b"hello\n").await.unwrap();
        stdout.flush().await.unwrap();
        drop((stdout, stderr));
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "default/c1 tag\nhello\n"
        );
    }
}
