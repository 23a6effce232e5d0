//! One running QEMU guest: [`QemuVm::start`] checks QEMU and the boot
//! files, creates the VM's run directory, starts QEMU and waits for its QMP
//! monitor; [`QemuVm::wait`] and [`QemuVm::stop`] end it and report a
//! [`GuestEnd`].
//!
//! Whatever way the VM ends (the guest powers off, `stop`, drop, or a
//! failure during `start`), the QEMU process is reaped and the run
//! directory with the QMP socket and QEMU's output is removed. The
//! vhost-user sockets belong to their servers and the console log to the
//! caller; both are left alone.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::accel::AccelChoice;
use super::binary::{check_version, locate_qemu, QemuVersion};
use super::command::qemu_arguments;
use super::config::QemuVmConfig;
use super::end::{classify, EndEvidence, GuestEnd};
use super::error::QemuError;
use super::process::QemuProcess;
use super::qmp::{QmpClient, QmpError};
use husk_vmm::host::probe_host_kvm;

/// How long QEMU gets to bring up its QMP monitor; it does so before the
/// guest runs, in milliseconds on an idle host.
const QMP_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest a single QMP read or write may block.
const QMP_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long QEMU gets to exit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// How much of QEMU's own output an error or [`GuestEnd::Crashed`] keeps.
const OUTPUT_TAIL_BYTES: usize = 4096;

/// Distinguishes the run directories of the VMs of one process.
static NEXT_VM_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A QEMU guest that was started; see the module documentation.
#[derive(Debug)]
pub struct QemuVm {
    process: QemuProcess,
    qmp: Option<QmpClient>,
    run_dir: RunDir,
    console_log: PathBuf,
    accel: AccelChoice,
    version: QemuVersion,
    quit_requested: bool,
    end: Option<GuestEnd>,
}

impl QemuVm {
    /// Starts the guest described by `config`. Returns once QEMU's QMP
    /// monitor answered, which is before the guest kernel runs.
    pub fn start(config: QemuVmConfig) -> Result<Self, QemuError> {
        let binary = locate_qemu(config.qemu_binary.as_deref())?;
        let version = check_version(&binary)?;
        require_file("guest kernel", &config.kernel)?;
        require_file("initrd", &config.initrd)?;
        if let Some(vsock) = &config.vsock {
            require_socket("vsock", &vsock.socket)?;
        }
        if let Some(fs) = &config.fs {
            require_socket("virtio-fs", &fs.socket)?;
        }
        std::fs::File::create(&config.console_log).map_err(|source| QemuError::CreateFile {
            path: config.console_log.clone(),
            source,
        })?;

        let accel = config.accel.resolve(probe_host_kvm);
        let run_dir = RunDir::create(&config.work_dir)?;
        let qmp_socket = run_dir.path.join("qmp.sock");
        let args = qemu_arguments(&config, accel.accel, &qmp_socket)?;
        tracing::info!(
            accel = %accel.accel,
            reason = %accel.reason,
            qemu = %binary.display(),
            %version,
            run_dir = %run_dir.path.display(),
            "starting a QEMU guest"
        );
        tracing::debug!(?args, "QEMU command line");
        let process = QemuProcess::spawn(&binary, &args, &run_dir.output_path())?;
        let mut vm = Self {
            process,
            qmp: None,
            run_dir,
            console_log: config.console_log,
            accel,
            version,
            quit_requested: false,
            end: None,
        };
        vm.qmp = Some(vm.connect_qmp(&qmp_socket)?);
        tracing::info!(pid = vm.pid(), "QEMU guest started");
        Ok(vm)
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The accelerator QEMU runs with, and why.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// The version of the QEMU that runs the guest.
    pub fn qemu_version(&self) -> QemuVersion {
        self.version
    }

    /// The VM's run directory (removed when the VM ends).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir.path
    }

    /// The file the guest's console is written to.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// The QMP client, while the VM runs.
    pub fn qmp(&mut self) -> Option<&mut QmpClient> {
        if self.end.is_some() {
            return None;
        }
        self.qmp.as_mut()
    }

    /// Waits up to `timeout` for the guest to end. `None` means it is still
    /// running; once it ended, every call returns the same [`GuestEnd`].
    pub fn wait(&mut self, timeout: Duration) -> Option<GuestEnd> {
        if self.end.is_none() {
            let status = self.process.wait_until(Instant::now() + timeout)?;
            self.conclude(status);
        }
        self.end.clone()
    }

    /// Waits up to `timeout` for the guest to end; if it does not, stops it
    /// and reports [`GuestEnd::TimedOut`].
    pub fn wait_or_stop(mut self, timeout: Duration) -> GuestEnd {
        if let Some(end) = self.wait(timeout) {
            return end;
        }
        tracing::warn!(
            pid = self.pid(),
            ?timeout,
            "the guest did not end in time; stopping it"
        );
        self.shut_down();
        GuestEnd::TimedOut
    }

    /// Ends the VM: QMP `quit`, then SIGKILL if QEMU is still there after
    /// [`QUIT_GRACE`]. Returns how the guest ended (which may be before
    /// `stop` was called).
    pub fn stop(mut self) -> GuestEnd {
        self.shut_down()
    }

    fn shut_down(&mut self) -> GuestEnd {
        if let Some(end) = &self.end {
            return end.clone();
        }
        if let Some(qmp) = self.qmp.as_mut() {
            self.quit_requested = true;
            // QEMU may close the connection before its reply arrives.
            match qmp.execute("quit", None) {
                Ok(_) | Err(QmpError::Closed) => {}
                Err(error) => tracing::warn!(pid = self.process.pid(), %error, "QMP quit failed"),
            }
        }
        let status = match self.process.wait_until(Instant::now() + QUIT_GRACE) {
            Some(status) => status,
            None => {
                tracing::warn!(pid = self.process.pid(), "QEMU ignored quit; killing it");
                self.process.kill_and_reap()
            }
        };
        self.conclude(status)
    }

    /// Records how the guest ended and removes the run directory.
    fn conclude(&mut self, status: std::process::ExitStatus) -> GuestEnd {
        if let Some(qmp) = self.qmp.as_mut() {
            qmp.read_remaining_events();
        }
        let console = read_lossy(&self.console_log);
        let qemu_output = tail(&read_lossy(&self.run_dir.output_path()), OUTPUT_TAIL_BYTES);
        let end = classify(EndEvidence {
            status,
            shutdown_reason: self.qmp.as_ref().and_then(QmpClient::last_shutdown_reason),
            quit_requested: self.quit_requested,
            console: &console,
            qemu_output: &qemu_output,
        });
        tracing::info!(pid = self.process.pid(), %status, ?end, "QEMU guest ended");
        self.qmp = None;
        self.run_dir.remove();
        self.end = Some(end.clone());
        end
    }

    /// Connects to QMP, retrying until QEMU created the socket; fails early
    /// with QEMU's output if QEMU exits first.
    fn connect_qmp(&mut self, socket: &Path) -> Result<QmpClient, QemuError> {
        let deadline = Instant::now() + QMP_STARTUP_TIMEOUT;
        loop {
            let attempt = QmpClient::connect(socket, QMP_IO_TIMEOUT);
            if let Some(status) = self.process.try_status() {
                let output = tail(&read_lossy(&self.run_dir.output_path()), OUTPUT_TAIL_BYTES);
                return Err(QemuError::ExitedAtStart { status, output });
            }
            match attempt {
                Ok(client) => return Ok(client),
                Err(source) if Instant::now() >= deadline => {
                    return Err(QemuError::Qmp {
                        socket: socket.to_path_buf(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.end.is_none() {
            let status = self.process.kill_and_reap();
            self.conclude(status);
        }
    }
}

/// The VM's private directory for its QMP socket and QEMU's output; removed
/// on [`RunDir::remove`] or drop.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    removed: bool,
}

impl RunDir {
    /// Creates `<work_dir>/husk-qemu-<pid>-<n>`, readable by the owner only.
    fn create(work_dir: &Path) -> Result<Self, QemuError> {
        loop {
            let sequence = NEXT_VM_SEQUENCE.fetch_add(1, Ordering::Relaxed);
            let path = work_dir.join(format!("husk-qemu-{}-{sequence}", std::process::id()));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    return Ok(Self {
                        path,
                        removed: false,
                    })
                }
                // Left behind by an earlier process with the same pid.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(QemuError::RunDir { path, source }),
            }
        }
    }

    fn output_path(&self) -> PathBuf {
        self.path.join("qemu.log")
    }

    fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove the VM run directory");
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        self.remove();
    }
}

fn require_file(what: &'static str, path: &Path) -> Result<(), QemuError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(QemuError::MissingFile {
            what,
            path: path.to_path_buf(),
        })
    }
}

fn require_socket(device: &'static str, path: &Path) -> Result<(), QemuError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        _ => Err(QemuError::VhostUserSocketMissing {
            device,
            path: path.to_path_buf(),
        }),
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `max_bytes` of `text`, cut at a character boundary.
fn tail(text: &str, max_bytes: usize) -> String {
    let mut start = text.len().saturating_sub(max_bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A scratch directory with a fake QEMU script, kernel and initrd.
    struct Scratch {
        dir: PathBuf,
    }

    impl Scratch {
        fn new(name: &str, fake_qemu: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("husk-qemu-vm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("work")).unwrap();
            std::fs::write(dir.join("qemu"), format!("#!/bin/sh\n{fake_qemu}\n")).unwrap();
            std::fs::set_permissions(dir.join("qemu"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            std::fs::write(dir.join("bzImage"), b"kernel").unwrap();
            std::fs::write(dir.join("initrd"), b"initrd").unwrap();
            Self { dir }
        }

        fn config(&self) -> QemuVmConfig {
            QemuVmConfig::new(
                self.dir.join("bzImage"),
                self.dir.join("initrd"),
                self.dir.join("console.log"),
            )
            .with_qemu_binary(self.dir.join("qemu"))
            .with_accel(super::super::Accel::Tcg)
            .with_work_dir(self.dir.join("work"))
        }

        fn work_dir_is_empty(&self) -> bool {
            std::fs::read_dir(self.dir.join("work"))
                .unwrap()
                .next()
                .is_none()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn qemu_older_than_7_2_is_refused_naming_the_debian_package() {
        let scratch = Scratch::new(
            "old",
            "echo 'QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)'",
        );
        let error = QemuVm::start(scratch.config()).unwrap_err();
        assert!(matches!(error, QemuError::VersionTooOld { .. }), "{error}");
        assert!(error.to_string().contains("qemu-system-x86"), "{error}");
        assert!(scratch.work_dir_is_empty());
    }

    #[test]
    fn qemu_exiting_at_startup_reports_its_output_and_leaves_no_run_dir() {
        let scratch = Scratch::new(
            "exits",
            "case \"$1\" in --version) echo 'QEMU emulator version 7.2.0'; exit 0;; esac\n\
             echo 'qemu-system-x86_64: -device nonsense: no such device' >&2\nexit 1",
        );
        let error = QemuVm::start(scratch.config()).unwrap_err();
        match &error {
            QemuError::ExitedAtStart { status, output } => {
                assert_eq!(status.code(), Some(1));
                assert!(output.contains("no such device"), "{output}");
            }
            other => panic!("expected ExitedAtStart, got {other}"),
        }
        assert!(
            scratch.work_dir_is_empty(),
            "the run directory is removed on failure"
        );
    }

    #[test]
    fn missing_kernel_and_vhost_user_socket_are_named() {
        let scratch = Scratch::new("missing", "echo 'QEMU emulator version 7.2.0'");
        let config = scratch.config();
        let mut without_kernel = config.clone();
        without_kernel.kernel = scratch.dir.join("no-bzImage");
        let error = QemuVm::start(without_kernel).unwrap_err();
        assert!(error.to_string().contains("no-bzImage"), "{error}");
        let socket = scratch.dir.join("vsock.sock");
        let error = QemuVm::start(config.with_vsock(&socket)).unwrap_err();
        assert!(
            matches!(&error, QemuError::VhostUserSocketMissing { path, .. } if *path == socket),
            "{error}"
        );
        assert!(scratch.work_dir_is_empty());
    }
}
