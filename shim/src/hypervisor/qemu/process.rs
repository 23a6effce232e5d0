//! Supervision of the QEMU process: spawn it (through [`super::spawner`],
//! so it dies with the shim, under its own identity and with the fds it
//! is given) with its output in a file, wait for it with a
//! deadline, kill it, and always reap it so no zombie is left. Dropping a
//! [`QemuProcess`] that is still running kills and reaps it.

use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::error::QemuError;
use super::spawner::{spawn_tied_to_shim, ChildSetup};

/// How often a waiting caller checks whether QEMU has exited. Short against
/// a guest's life (seconds), long enough to cost nothing.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A running (or ended and reaped) QEMU process.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    status: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts `binary` with `args`, set up as `setup` says; its stdout and
    /// stderr go to `output`. The process is killed if the shim dies.
    pub fn spawn(
        binary: &Path,
        args: &[OsString],
        output: &Path,
        setup: ChildSetup,
    ) -> Result<Self, QemuError> {
        let create_error = |source| QemuError::CreateFile {
            path: output.to_path_buf(),
            source,
        };
        let stdout = File::create(output).map_err(create_error)?;
        let stderr = stdout.try_clone().map_err(create_error)?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let identity = match &setup.identity {
            Some((uid, gid, groups)) => format!("uid {uid} gid {gid} groups {groups:?}"),
            None => "the shim's user".to_owned(),
        };
        let child = spawn_tied_to_shim(command, setup).map_err(|source| QemuError::Spawn {
            binary: binary.to_path_buf(),
            identity,
            source,
        })?;
        Ok(Self {
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if QEMU has exited (reaping it), else `None`.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(error) => tracing::warn!(pid = self.pid(), %error, "cannot wait for QEMU"),
            }
        }
        self.status
    }

    /// Waits until QEMU exits or `deadline` passes.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
    }

    /// Sends SIGKILL (unless QEMU already exited) and reaps it.
    pub fn kill_and_reap(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        if let Err(error) = self.child.kill() {
            tracing::warn!(pid = self.pid(), %error, "cannot kill QEMU");
        }
        loop {
            match self.child.wait() {
                Ok(status) => {
                    self.status = Some(status);
                    return status;
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // Only possible if the child was reaped elsewhere
                    // (ECHILD); there is nothing left to wait for.
                    tracing::error!(pid = self.pid(), %error, "cannot reap QEMU");
                    let status = std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL);
                    self.status = Some(status);
                    return status;
                }
            }
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_and_reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_file(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("husk-qemu-process-{name}-{}", std::process::id()))
    }

    fn is_alive(pid: u32) -> bool {
        // SAFETY: kill with signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }

    #[test]
    fn output_is_captured_and_exit_status_reported() {
        let output = output_file("echo");
        let args = [
            "-c".into(),
            "echo to-stdout; echo to-stderr >&2; exit 3".into(),
        ];
        let mut process =
            QemuProcess::spawn(Path::new("/bin/sh"), &args, &output, ChildSetup::default())
                .unwrap();
        let status = process.wait_until(Instant::now() + Duration::from_secs(10));
        assert_eq!(status.and_then(|s| s.code()), Some(3));
        let text = std::fs::read_to_string(&output).unwrap();
        std::fs::remove_file(&output).unwrap();
        assert!(
            text.contains("to-stdout") && text.contains("to-stderr"),
            "{text}"
        );
    }

    #[test]
    fn wait_returns_at_the_deadline_and_kill_reaps() {
        let output = output_file("sleep");
        let args = ["1000".into()];
        let mut process = QemuProcess::spawn(
            Path::new("/bin/sleep"),
            &args,
            &output,
            ChildSetup::default(),
        )
        .unwrap();
        let pid = process.pid();
        let started = Instant::now();
        assert_eq!(
            process.wait_until(started + Duration::from_millis(50)),
            None
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let status = process.kill_and_reap();
        std::fs::remove_file(&output).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(
            !is_alive(pid),
            "process {pid} is still there (a zombie would be)"
        );
    }

    #[test]
    fn dropping_a_running_process_kills_and_reaps_it() {
        let output = output_file("drop");
        let args = ["1000".into()];
        let process = QemuProcess::spawn(
            Path::new("/bin/sleep"),
            &args,
            &output,
            ChildSetup::default(),
        )
        .unwrap();
        let pid = process.pid();
        drop(process);
        std::fs::remove_file(&output).unwrap();
        assert!(
            !is_alive(pid),
            "process {pid} is still there (a zombie would be)"
        );
    }

    #[test]
    fn missing_binary_error_names_it() {
        let output = output_file("missing");
        let error = QemuProcess::spawn(
            Path::new("/nonexistent/qemu"),
            &[],
            &output,
            ChildSetup::default(),
        )
        .unwrap_err();
        let _ = std::fs::remove_file(&output);
        assert!(error.to_string().contains("/nonexistent/qemu"), "{error}");
    }
}
