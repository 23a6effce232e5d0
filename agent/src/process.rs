//! One process the agent runs for the host (a container's init or an exec):
//! its stdio plumbing, its exit, and what the host may do to it (wait,
//! close stdin, resize the terminal).
//!
//! The exit is reported only after the process's output has drained: the
//! output pumps run until the pipes (or the pty) reach end of file, which
//! happens once every writer is gone, so bytes written just before exit
//! reach the host before `WaitProcess` returns or the exit event appears.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use husk_protocols::agent::{ProcessExited, StdioStreams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{AgentError, Result};
use crate::events::EventLog;
use crate::helper::ChildStdio;
use crate::reaper::Exit;
use crate::stdio::{pipe, pump, FdStream, HostStream, StreamRegistry};

/// How long output may keep flowing after the process exited: longer than
/// any drain of buffered pipe data; it only ends early when a background
/// child the process left behind keeps the pipe open.
const OUTPUT_DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// The agent's side of a process's stdio, before the process exists.
pub enum AgentIo {
    Pipes {
        stdin: Option<(OwnedFd, HostStream)>,
        stdout: Option<(OwnedFd, HostStream)>,
        stderr: Option<(OwnedFd, HostStream)>,
    },
    Terminal {
        console: OwnedFd,
        stream: HostStream,
    },
}

/// Claims the streams `stdio` names and makes the pipes (or the console
/// socket) for a new process: what its helper hands down, and what the
/// agent keeps.
pub async fn prepare_io(
    streams: &StreamRegistry,
    stdio: &StdioStreams,
) -> Result<(ChildStdio, AgentIo)> {
    if stdio.terminal {
        if stdio.stdout_id.is_empty() {
            return Err(AgentError::InvalidRequest(
                "a terminal needs a stream (stdout_id)".into(),
            ));
        }
        let stream = streams.claim(&stdio.stdout_id).await?;
        let (console, child_console) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| AgentError::Io {
            op: "create",
            path: "console socket pair".into(),
            source: e.into(),
        })?;
        return Ok((
            ChildStdio {
                stdin: Stdio::null(),
                stdout: Stdio::null(),
                stderr: Stdio::null(),
                console: Some(child_console),
            },
            AgentIo::Terminal { console, stream },
        ));
    }
    let ids = [&stdio.stdin_id, &stdio.stdout_id, &stdio.stderr_id];
    let mut claimed = Vec::new();
    for id in ids {
        claimed.push(if id.is_empty() {
            None
        } else {
            Some(streams.claim(id).await?)
        });
    }
    let mut claimed = claimed.into_iter();
    let mut next = || claimed.next().flatten();
    let (stdin_stream, stdout_stream, stderr_stream) = (next(), next(), next());
    let (child_stdin, agent_stdin) = match stdin_stream {
        Some(stream) => {
            let (read, write) = pipe()?;
            (Stdio::from(read), Some((write, stream)))
        }
        None => (Stdio::null(), None),
    };
    let output = |stream: Option<HostStream>| -> Result<(Stdio, Option<(OwnedFd, HostStream)>)> {
        match stream {
            Some(stream) => {
                let (read, write) = pipe()?;
                Ok((Stdio::from(write), Some((read, stream))))
            }
            None => Ok((Stdio::null(), None)),
        }
    };
    let (child_stdout, agent_stdout) = output(stdout_stream)?;
    let (child_stderr, agent_stderr) = output(stderr_stream)?;
    Ok((
        ChildStdio {
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
            console: None,
        },
        AgentIo::Pipes {
            stdin: agent_stdin,
            stdout: agent_stdout,
            stderr: agent_stderr,
        },
    ))
}

/// A running (or finished) process.
pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub pid: i32,
    stdin: Mutex<Option<JoinHandle<u64>>>,
    /// The pty master, for window size changes.
    pty: Option<OwnedFd>,
    done: watch::Receiver<Option<Exit>>,
}

/// What a process's end triggers besides its own report.
pub type OnExit = Box<dyn FnOnce(&Exit) + Send>;

fn fd_stream(fd: OwnedFd, what: &str) -> Result<FdStream> {
    FdStream::new(fd).map_err(AgentError::io("watch", what))
}

impl Process {
    /// Connects the prepared stdio to the process `pid` (whose helper has
    /// returned) and follows it until it exits.
    pub async fn follow(
        container_id: &str,
        exec_id: &str,
        pid: i32,
        io: AgentIo,
        exit: oneshot::Receiver<Exit>,
        events: EventLog,
        on_exit: OnExit,
    ) -> Result<std::sync::Arc<Self>> {
        let mut outputs: Vec<JoinHandle<u64>> = Vec::new();
        let mut stdin_task = None;
        let mut pty = None;
        match io {
            AgentIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                if let Some((pipe, stream)) = stdin {
                    let pipe = fd_stream(pipe, "stdin pipe")?;
                    stdin_task = Some(tokio::spawn(pump(stream, pipe, "stdin")));
                }
                for (output, what) in [(stdout, "stdout"), (stderr, "stderr")] {
                    if let Some((pipe, stream)) = output {
                        let pipe = fd_stream(pipe, what)?;
                        outputs.push(tokio::spawn(pump(pipe, stream, what)));
                    }
                }
            }
            AgentIo::Terminal { console, stream } => {
                let master = tokio::task::spawn_blocking(move || {
                    husk_runtime::console::recv_fd(console.as_raw_fd())
                })
                .await
                .map_err(|e| AgentError::InvalidRequest(e.to_string()))?
                .map_err(|source| AgentError::Runtime {
                    id: container_id.to_owned(),
                    op: "receive the terminal",
                    source,
                })?;
                let dup =
                    |fd: &OwnedFd| fd.try_clone().map_err(AgentError::io("dup", "pty master"));
                let reader = fd_stream(dup(&master)?, "pty master")?;
                let writer = fd_stream(dup(&master)?, "pty master")?;
                let (from_host, to_host) = tokio::io::split(stream);
                outputs.push(tokio::spawn(pump(reader, to_host, "terminal output")));
                stdin_task = Some(tokio::spawn(pump(from_host, writer, "terminal input")));
                pty = Some(master);
            }
        }
        let (done_sender, done) = watch::channel(None);
        let process = std::sync::Arc::new(Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            stdin: Mutex::new(stdin_task),
            pty,
            done,
        });
        let finishing = process.clone();
        tokio::spawn(async move {
            // A dropped sender means the reaper is gone: report an unknown end.
            let exit = exit.await.unwrap_or(Exit {
                status: 255,
                at: std::time::SystemTime::now(),
            });
            on_exit(&exit);
            let drained = async {
                for output in outputs {
                    let _ = output.await;
                }
            };
            if tokio::time::timeout(OUTPUT_DRAIN_AFTER_EXIT, drained)
                .await
                .is_err()
            {
                tracing::warn!(
                    container = %finishing.container_id, exec = %finishing.exec_id,
                    "output still open after the process exited; reporting the exit"
                );
            }
            finishing.close_stdin();
            tracing::info!(
                container = %finishing.container_id, exec = %finishing.exec_id,
                pid, status = exit.status, "process exited"
            );
            // The event first: a host that saw WaitProcess return finds the
            // exit (and any OOM kill before it) in the event log.
            events.process_exited(ProcessExited {
                container_id: finishing.container_id.clone(),
                exec_id: finishing.exec_id.clone(),
                pid: pid as u32,
                exit_status: exit.status,
                exited_at_unix_ns: exit.unix_ns(),
                ..Default::default()
            });
            let _ = done_sender.send(Some(exit));
        });
        Ok(process)
    }

    /// The exit, once reported.
    pub fn exited(&self) -> Option<Exit> {
        *self.done.borrow()
    }

    /// Waits for the exit report (output drained).
    pub async fn wait(&self) -> Exit {
        let mut done = self.done.clone();
        let exit = match done.wait_for(Option::is_some).await {
            Ok(exit) => *exit,
            Err(_) => None,
        };
        exit.unwrap_or(Exit {
            status: 255,
            at: std::time::SystemTime::now(),
        })
    }

    /// Closes the process's stdin (the host has no more input).
    pub fn close_stdin(&self) {
        let task = self
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u32, columns: u32) -> Result<()> {
        let pty = self.pty.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "process {:?} of container {} has no terminal",
                self.exec_id, self.container_id
            ))
        })?;
        let size = libc::winsize {
            ws_row: u16::try_from(rows)
                .map_err(|_| AgentError::InvalidRequest(format!("{rows} rows")))?,
            ws_col: u16::try_from(columns)
                .map_err(|_| AgentError::InvalidRequest(format!("{columns} columns")))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
            return Err(AgentError::io("resize", "pty")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}
