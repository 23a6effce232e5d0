//! The runtime helper: container create and exec run in a short-lived,
//! single-threaded child of the agent (`husk-agent __runtime-helper`),
//! because the runtime crate forks the container's init stages and a fork
//! from the multi-threaded agent could inherit locks held by other threads.
//!
//! The helper's stdin, stdout and stderr are the container process's stdio
//! (the runtime hands its own stdio down, as runc does); fd 3 carries the
//! one-line JSON reply (the new process's pid, or the error with its status
//! code); fd 4, for a terminal, is the console socket the container sends
//! its pty master over. Once the helper exits, the container process is
//! re-parented to the agent (PID 1, or a child subreaper in test mode),
//! whose reaper sees its exit.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use husk_runtime::{Container, ContainerBuilder, ExecOptions};
use oci_spec::runtime::Process;
use serde::{Deserialize, Serialize};

use crate::error::{runtime_code, AgentError, Result};
use crate::reaper::Reaper;

/// The argument that selects helper mode.
pub const HELPER_ARG: &str = "__runtime-helper";
/// The descriptor the helper writes its reply to.
const REPLY_FD: i32 = 3;
/// The descriptor of the console socket, for a terminal.
const CONSOLE_FD: i32 = 4;

/// What the helper is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperRequest {
    /// Create container `id` from `bundle`; the init waits for start.
    Create {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        terminal: bool,
    },
    /// Start `process` in the running container `id`.
    Exec {
        root: PathBuf,
        id: String,
        process: Box<Process>,
        terminal: bool,
    },
}

impl HelperRequest {
    fn id(&self) -> &str {
        match self {
            HelperRequest::Create { id, .. } | HelperRequest::Exec { id, .. } => id,
        }
    }

    fn op(&self) -> &'static str {
        match self {
            HelperRequest::Create { .. } => "create",
            HelperRequest::Exec { .. } => "exec",
        }
    }
}

/// The helper's answer.
#[derive(Debug, Serialize, Deserialize)]
enum HelperReply {
    Pid(i32),
    Failed { code: i32, message: String },
}

/// The descriptors a helper hands to the new process.
pub struct ChildStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// The container's end of the console socket (terminal only).
    pub console: Option<OwnedFd>,
}

/// Runs the helper for `request` and returns the new process's pid.
pub async fn run(reaper: &Reaper, request: HelperRequest, stdio: ChildStdio) -> Result<i32> {
    let id = request.id().to_owned();
    let op = request.op();
    let failed = |message: String| AgentError::Helper {
        id: id.clone(),
        op,
        message,
        code: ttrpc::Code::INTERNAL,
    };
    let request_json = serde_json::to_string(&request).map_err(|e| failed(e.to_string()))?;
    let (reply_read, reply_write) = crate::stdio::pipe()?;
    let reply_raw = reply_write.as_raw_fd();
    let console_raw = stdio.console.as_ref().map(AsRawFd::as_raw_fd);
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(HELPER_ARG)
        .arg(request_json)
        .stdin(stdio.stdin)
        .stdout(stdio.stdout)
        .stderr(stdio.stderr);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (fcntl, dup2) on descriptors it owns.
    unsafe {
        command.pre_exec(move || place_fds(reply_raw, console_raw));
    }
    let child = command
        .spawn()
        .map_err(|e| failed(format!("cannot start the runtime helper: {e}")))?;
    // The reaper owns the child's exit; `Child` is never waited on.
    let helper_exit = reaper.watch(child.id() as i32);
    drop(child);
    // Close our copies of the process's stdio: its output ends with it.
    drop(command);
    drop(reply_write);
    drop(stdio.console);
    // One line, not end of file: the container's init keeps a copy of fd 3
    // until it execs (its descriptors close on exec, after `start`).
    let reply = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::io::BufReader::new(std::fs::File::from(reply_read))
            .read_line(&mut text)
            .map(|_| text)
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(format!("reading the helper's reply: {e}")))?;
    let exit = helper_exit.await.ok();
    match serde_json::from_str::<HelperReply>(reply.trim()) {
        Ok(HelperReply::Pid(pid)) => Ok(pid),
        Ok(HelperReply::Failed { code, message }) => Err(AgentError::Helper {
            id,
            op,
            message,
            code: <ttrpc::Code as protobuf::Enum>::from_i32(code).unwrap_or(ttrpc::Code::INTERNAL),
        }),
        Err(_) => Err(failed(format!(
            "the runtime helper ended without a reply (exit status {})",
            exit.map_or_else(|| "unknown".to_owned(), |e| e.status.to_string())
        ))),
    }
}

/// In the forked child: the reply pipe to fd 3, the console to fd 4, both
/// kept across exec.
fn place_fds(reply: i32, console: Option<i32>) -> std::io::Result<()> {
    // Move the console out of the way first: it may sit on fd 3.
    let console = match console {
        // SAFETY: fcntl on a descriptor this process owns.
        Some(fd) => Some(check(unsafe {
            libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10)
        })?),
        None => None,
    };
    for (from, to) in std::iter::once((reply, REPLY_FD)).chain(console.map(|c| (c, CONSOLE_FD))) {
        // SAFETY: dup2 and fcntl on descriptors this process owns.
        unsafe {
            if from != to {
                check(libc::dup2(from, to))?;
            }
            check(libc::fcntl(to, libc::F_SETFD, 0))?;
        }
    }
    Ok(())
}

fn check(result: i32) -> std::io::Result<i32> {
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Helper mode's main: performs the request in `json` and exits.
pub fn main(json: &str) -> ! {
    let reply = match serde_json::from_str::<HelperRequest>(json) {
        Ok(request) => match perform(request) {
            Ok(pid) => HelperReply::Pid(pid),
            Err(error) => HelperReply::Failed {
                code: runtime_code(&error) as i32,
                message: error.to_string(),
            },
        },
        Err(error) => HelperReply::Failed {
            code: ttrpc::Code::INVALID_ARGUMENT as i32,
            message: format!("bad helper request: {error}"),
        },
    };
    // SAFETY: fd 3 was placed by the agent for this process alone.
    let mut out = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(REPLY_FD) });
    let text = serde_json::to_string(&reply).unwrap_or_default();
    let code = i32::from(writeln!(out, "{text}").is_err());
    std::process::exit(code)
}

fn perform(request: HelperRequest) -> husk_runtime::Result<i32> {
    // SAFETY: fd 4 was placed by the agent for this process alone, and only
    // when a terminal was asked for.
    let console = |terminal: bool| terminal.then(|| unsafe { OwnedFd::from_raw_fd(CONSOLE_FD) });
    match request {
        HelperRequest::Create {
            root,
            id,
            bundle,
            terminal,
        } => {
            let mut builder = ContainerBuilder::new(id)
                .with_root(root)
                .with_bundle(bundle);
            if let Some(fd) = console(terminal) {
                builder = builder.with_console_fd(fd);
            }
            builder.create().map(|c| c.pid())
        }
        HelperRequest::Exec {
            root,
            id,
            process,
            terminal,
        } => {
            let container = Container::load(root, &id)?;
            container.exec(ExecOptions {
                process: Some(*process),
                console_fd: console(terminal).map(std::sync::Arc::new),
                ..Default::default()
            })
        }
    }
}
