//! The host ends of a process's stdio streams: which pipes a process gets
//! ([`Pipes`], and the stream ids the agent names them by), opening them
//! on the agent's stdio socket before the process is created
//! ([`HostStdio::open`]), and the reads the checks make, each bounded by a
//! timeout so a stalled stream fails the check instead of hanging it.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use husk_agent_client::agent::StdioStreams;
use husk_agent_client::AgentClient;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Which stdio streams a process gets. With `terminal`, one stream (the
/// stdout id) carries the pty both ways and the other two are unused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pipes {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

impl Pipes {
    pub const NONE: Pipes = Pipes {
        stdin: false,
        stdout: false,
        stderr: false,
        terminal: false,
    };
    pub const OUT_ERR: Pipes = Pipes {
        stdin: false,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    pub const ALL: Pipes = Pipes {
        stdin: true,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    pub const TERMINAL: Pipes = Pipes {
        stdin: false,
        stdout: false,
        stderr: false,
        terminal: true,
    };

    /// The stream ids for a process whose ids start with `prefix`.
    pub fn stream_ids(self, prefix: &str) -> StdioStreams {
        let name = |on: bool, pipe: &str| {
            if on {
                format!("{prefix}-{pipe}")
            } else {
                String::new()
            }
        };
        StdioStreams {
            stdin_id: name(self.stdin && !self.terminal, "stdin"),
            stdout_id: name(self.stdout || self.terminal, "stdout"),
            stderr_id: name(self.stderr && !self.terminal, "stderr"),
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// The host ends of one process's stdio streams.
#[derive(Debug, Default)]
pub struct HostStdio {
    pub stdin: Option<UnixStream>,
    /// The pty's stream for a process on a terminal.
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
}

impl HostStdio {
    /// Opens the host end of every stream `ids` names (an empty id is a
    /// stream the process does not get).
    pub async fn open(client: &AgentClient, ids: &StdioStreams) -> Result<Self> {
        let open = |id: &str| {
            let id = id.to_owned();
            async move {
                if id.is_empty() {
                    return Ok(None);
                }
                client
                    .open_stdio(&id)
                    .await
                    .map(Some)
                    .with_context(|| format!("cannot open stdio stream {id}"))
            }
        };
        Ok(Self {
            stdin: open(&ids.stdin_id).await?,
            stdout: open(&ids.stdout_id).await?,
            stderr: open(&ids.stderr_id).await?,
        })
    }

    /// The stdout stream, which the process must have been given.
    pub fn take_stdout(&mut self) -> Result<UnixStream> {
        self.stdout
            .take()
            .context("the process was created without a stdout stream")
    }

    pub fn take_stderr(&mut self) -> Result<UnixStream> {
        self.stderr
            .take()
            .context("the process was created without a stderr stream")
    }

    pub fn take_stdin(&mut self) -> Result<UnixStream> {
        self.stdin
            .take()
            .context("the process was created without a stdin stream")
    }
}

/// Everything `stream` carries until end of file, within `timeout`.
pub async fn read_to_end(stream: &mut UnixStream, timeout: Duration) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    match tokio::time::timeout(timeout, stream.read_to_end(&mut data)).await {
        Ok(Ok(_)) => Ok(data),
        Ok(Err(error)) => Err(error).context("reading a stdio stream failed"),
        Err(_) => bail!(
            "a stdio stream did not reach end of file within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&data)
        ),
    }
}

/// Like [`read_to_end`], as text.
pub async fn read_text(stream: &mut UnixStream, timeout: Duration) -> Result<String> {
    let data = read_to_end(stream, timeout).await?;
    String::from_utf8(data).context("a stdio stream carried text that is not UTF-8")
}

/// Reads until `needle` has appeared (within `timeout`); returns all read.
pub async fn read_until(
    stream: &mut UnixStream,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut data = Vec::new();
    while !String::from_utf8_lossy(&data).contains(needle) {
        let mut buffer = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(read) => read.context("reading a stdio stream failed")?,
            Err(_) => bail!(
                "{needle:?} did not arrive within {timeout:?}; got {:?}",
                String::from_utf8_lossy(&data)
            ),
        };
        ensure!(
            n > 0,
            "end of file before {needle:?}; got {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8(data).context("a stdio stream carried text that is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn a_terminal_gets_one_stream_and_pipes_one_each() {
        let ids = |pipes: Pipes| {
            let ids = pipes.stream_ids("c1");
            (ids.stdin_id, ids.stdout_id, ids.stderr_id, ids.terminal)
        };
        let owned = |a: &str, b: &str, c: &str, terminal| (a.into(), b.into(), c.into(), terminal);
        assert_eq!(
            ids(Pipes::ALL),
            owned("c1-stdin", "c1-stdout", "c1-stderr", false)
        );
        assert_eq!(
            ids(Pipes::OUT_ERR),
            owned("", "c1-stdout", "c1-stderr", false)
        );
        assert_eq!(ids(Pipes::TERMINAL), owned("", "c1-stdout", "", true));
        assert_eq!(ids(Pipes::NONE), owned("", "", "", false));
    }

    #[tokio::test]
    async fn reads_return_what_arrived_and_fail_at_their_timeout() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        guest.write_all(b"one\ntwo\n").await.unwrap();
        let got = read_until(&mut host, "one", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(got.starts_with("one"), "{got:?}");
        let error = read_until(&mut host, "three", Duration::from_millis(50))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("did not arrive"), "{error}");
        let error = read_to_end(&mut host, Duration::from_millis(50))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("end of file"), "{error}");
        guest.write_all(b"rest").await.unwrap();
        drop(guest);
        let rest = read_text(&mut host, Duration::from_secs(5)).await.unwrap();
        assert!(rest.ends_with("rest"), "{rest:?}");
    }
}
