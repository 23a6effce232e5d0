//! A small synchronous QMP client: the QEMU Machine Protocol over the Unix
//! socket in the VM's run directory.
//!
//! QMP is line-delimited JSON: QEMU greets with `{"QMP": …}`, the client
//! leaves negotiation mode with `qmp_capabilities`, then each command gets
//! one `{"return": …}` or `{"error": …}`, with asynchronous `{"event": …}`
//! lines in between. The client keeps every event it reads: the last
//! `SHUTDOWN` event says whether the guest or the host ended the VM, and
//! after QEMU exits the events still buffered in the socket are read to EOF.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed (connect, read, write or timeout).
    #[error("QMP socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A line that is not a QMP message.
    #[error("not a QMP message: {line:?}")]
    Malformed { line: String },
    /// The first message was not QMP's greeting.
    #[error("expected the QMP greeting, got {line:?}")]
    NoGreeting { line: String },
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {description}")]
    CommandFailed {
        command: String,
        class: String,
        description: String,
    },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
}

/// One QMP connection, negotiated and ready for commands.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<QmpEvent>,
}

impl QmpClient {
    /// Connects to `socket`, reads the greeting and negotiates
    /// capabilities. Every read and write waits at most `io_timeout`.
    pub fn connect(socket: &Path, io_timeout: Duration) -> Result<Self, QmpError> {
        Self::over(UnixStream::connect(socket)?, io_timeout)
    }

    /// Speaks QMP over `stream`, already connected to QEMU's monitor (the
    /// backend's end of a socket pair): reads the greeting, negotiates
    /// capabilities. Each read or write may block up to `io_timeout`.
    pub fn over(stream: UnixStream, io_timeout: Duration) -> Result<Self, QmpError> {
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = client.read_line()?;
        match serde_json::from_str::<Value>(&greeting) {
            Ok(message) if message.get("QMP").is_some() => {}
            _ => return Err(QmpError::NoGreeting { line: greeting }),
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// Runs `command` and returns its `return` value. Events read while
    /// waiting are kept.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_owned()
                };
                return Err(QmpError::CommandFailed {
                    command: command.to_owned(),
                    class: text("class"),
                    description: text("desc"),
                });
            }
            // An event: read_message kept it.
        }
    }

    /// Reads what QEMU still sent before closing the connection (call once
    /// QEMU has exited, so EOF is near); stops at EOF, a timeout or an
    /// error, which only mean there is nothing more to read.
    pub fn read_remaining_events(&mut self) {
        loop {
            match self.read_message() {
                Ok(_) => {}
                Err(QmpError::Malformed { .. }) => {}
                Err(_) => return,
            }
        }
    }

    /// Every event received so far, oldest first.
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    /// The `reason` of the last `SHUTDOWN` event (`guest-reset`,
    /// `guest-shutdown`, `guest-panic`, `host-qmp-quit`, `host-signal`, …).
    pub fn last_shutdown_reason(&self) -> Option<&str> {
        self.events
            .iter()
            .rev()
            .find(|event| event.name == "SHUTDOWN")
            .and_then(|event| event.data.get("reason"))
            .and_then(Value::as_str)
    }

    /// Reads one message; events are also appended to `self.events`.
    fn read_message(&mut self) -> Result<Value, QmpError> {
        let line = self.read_line()?;
        let message: Value =
            serde_json::from_str(&line).map_err(|_| QmpError::Malformed { line: line.clone() })?;
        if !message.is_object() {
            return Err(QmpError::Malformed { line });
        }
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            self.events.push(QmpEvent {
                name: name.to_owned(),
                data: message.get("data").cloned().unwrap_or(Value::Null),
            });
        }
        Ok(message)
    }

    fn read_line(&mut self) -> Result<String, QmpError> {
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if line.trim().is_empty() => line.clear(),
                Ok(_) => return Ok(line.trim_end().to_owned()),
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A fake QEMU monitor: greets, then answers each request line with the
    /// next scripted reply lines, then closes.
    fn fake_qemu(
        name: &str,
        replies: Vec<Vec<&'static str>>,
    ) -> (std::path::PathBuf, thread::JoinHandle<Vec<String>>) {
        let dir = test_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut requests = Vec::new();
            for reply in replies {
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                requests.push(request.trim().to_owned());
                for line in reply {
                    stream.write_all(line.as_bytes()).unwrap();
                    stream.write_all(b"\r\n").unwrap();
                }
            }
            // What QEMU does when it exits: the client reads to EOF.
            stream.shutdown(std::net::Shutdown::Both).unwrap();
            requests
        });
        (socket, server)
    }

    fn test_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-qmp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Waits for the fake monitor and removes its directory.
    fn finish(socket: &Path, server: thread::JoinHandle<Vec<String>>) -> Vec<String> {
        let requests = server.join().unwrap();
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
        requests
    }

    #[test]
    fn capabilities_are_negotiated_and_commands_return_values() {
        let (socket, server) = fake_qemu(
            "ok",
            vec![
                vec![r#"{"return": {}}"#],
                vec![r#"{"return": {"status": "running", "running": true}}"#],
            ],
        );
        let mut client = QmpClient::connect(&socket, TIMEOUT).unwrap();
        let status = client.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        drop(client);
        let requests = finish(&socket, server);
        assert_eq!(
            requests,
            [
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"query-status"}"#
            ]
        );
    }

    #[test]
    fn command_error_carries_class_and_description() {
        let (socket, server) = fake_qemu(
            "err",
            vec![
                vec![r#"{"return": {}}"#],
                vec![
                    r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
                ],
            ],
        );
        let mut client = QmpClient::connect(&socket, TIMEOUT).unwrap();
        let error = client.execute("nope", None).unwrap_err();
        assert!(
            matches!(&error, QmpError::CommandFailed { command, class, .. } if command == "nope" && class == "CommandNotFound"),
            "{error}"
        );
        drop(client);
        finish(&socket, server);
    }

    #[test]
    fn shutdown_reason_is_read_from_events_sent_before_qemu_exits() {
        let (socket, server) = fake_qemu(
            "events",
            vec![
                vec![r#"{"return": {}}"#],
                vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
                    r#"{"return": {}}"#,
                    r#"{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#,
                ],
            ],
        );
        let mut client = QmpClient::connect(&socket, TIMEOUT).unwrap();
        client.execute("stop", None).unwrap();
        assert_eq!(client.last_shutdown_reason(), None);
        client.read_remaining_events();
        assert_eq!(client.last_shutdown_reason(), Some("guest-reset"));
        let names: Vec<_> = client.events().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["STOP", "SHUTDOWN"]);
        drop(client);
        finish(&socket, server);
    }

    #[test]
    fn a_peer_that_is_not_qmp_is_rejected() {
        let dir = test_dir("bad");
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"SSH-2.0-OpenSSH\r\n").unwrap();
        });
        let error = QmpClient::connect(&socket, TIMEOUT).unwrap_err();
        assert!(matches!(error, QmpError::NoGreeting { .. }), "{error}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
