//! One running QEMU guest: [`QemuVm::start_paused`] checks QEMU and the
//! boot files, picks who QEMU runs as and checks that user can open what
//! QEMU opens, creates the VM's run directory, makes QEMU's sockets (socket
//! pairs for the console and QMP, a connection to each vhost-user server),
//! starts QEMU with its vCPUs stopped and those sockets as its only
//! inherited fds, and waits for its QMP monitor;
//! [`PausedQemuVm::resume`] lets the guest run ([`QemuVm::start`] does
//! both). [`QemuVm::wait`] and [`QemuVm::stop`] end it and report a
//! [`GuestEnd`].
//!
//! The console arrives on a socket and goes to the capped, rotating
//! [`ConsoleLog`]; how the guest ended is read from its last
//! [`CONSOLE_TAIL_BYTES`].
//!
//! Whatever way the VM ends (the guest powers off, `stop`, drop, or a
//! failure during `start`), the QEMU process is reaped, then its uid is
//! given back, and the run directory with QEMU's output is removed. The
//! vhost-user sockets belong to their servers and the console log files to
//! the caller; both are left alone.

use std::fs::DirBuilder;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::accel::AccelChoice;
use super::accel::ResolvedAccel;
use super::binary::{check_version, locate_qemu, QemuVersion};
use super::command::{qemu_arguments, QemuFds};
use super::config::QemuVmConfig;
use super::end::{classify, EndEvidence, GuestEnd};
use super::error::QemuError;
use super::identity::{QemuIdentity, RunAs, UidLease};
use super::process::QemuProcess;
use super::qmp::{QmpClient, QmpError};
use super::spawner::ChildSetup;
use crate::hypervisor::console::{read_tail, ConsoleLog, CONSOLE_TAIL_BYTES};
use husk_vmm::host::probe_host_kvm;

/// How long QEMU gets to bring up its QMP monitor; it does so before the
/// guest runs, in milliseconds on an idle host.
const QMP_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The longest a single QMP read or write may block.
const QMP_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long QEMU gets to exit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// The device QEMU opens for `-accel kvm`.
const KVM_DEVICE: &str = "/dev/kvm";

/// The settings an error about QEMU's identity points at.
const RUN_AS_SETTING: &str = "hypervisor.qemu_run_as";
const ID_RANGE_SETTING: &str = "hypervisor.qemu_id_count";

/// How long the console gets, once QEMU exited, to reach its file.
const CONSOLE_DRAIN_PATIENCE: Duration = Duration::from_secs(2);

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
    console: ConsoleLog,
    accel: AccelChoice,
    version: QemuVersion,
    quit_requested: bool,
    end: Option<GuestEnd>,
    /// Who QEMU runs as; `None` for root.
    identity: Option<QemuIdentity>,
    /// Holds QEMU's uid. Declared after `process`, so that a dropped VM
    /// frees the uid only after QEMU was reaped.
    _uid_lease: Option<UidLease>,
}

impl QemuVm {
    /// Starts the guest described by `config`. Returns once QEMU's QMP
    /// monitor answered and the guest was resumed, which is before the
    /// guest kernel printed anything.
    pub fn start(config: QemuVmConfig) -> Result<Self, QemuError> {
        Self::start_paused(config)?.resume()
    }

    /// Starts QEMU for the guest described by `config` with its vCPUs
    /// stopped: returns once QMP answered and QEMU connected to the
    /// console, before any guest instruction ran.
    /// [`PausedQemuVm::resume`] lets the guest run.
    pub fn start_paused(config: QemuVmConfig) -> Result<PausedQemuVm, QemuError> {
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
        if let Some(net) = &config.net {
            require_socket("virtio-net", &net.socket)?;
        }

        let accel = config.accel.resolve(probe_host_kvm);
        let (uid_lease, identity) = choose_identity(&config, accel.accel)?;
        let run_dir = RunDir::create(&config.work_dir)?;
        let pair =
            |what| UnixStream::pair().map_err(|source| QemuError::SocketPair { what, source });
        let (qmp_ours, qmp_qemus) = pair("QMP monitor")?;
        let (console_ours, console_qemus) = pair("serial console")?;
        let connect = |device, path: &Path| {
            UnixStream::connect(path).map_err(|source| QemuError::VhostUserConnect {
                device,
                path: path.to_path_buf(),
                source,
            })
        };
        let vsock = config
            .vsock
            .as_ref()
            .map(|vsock| connect("vsock", &vsock.socket))
            .transpose()?;
        let fs = config
            .fs
            .as_ref()
            .map(|fs| connect("virtio-fs", &fs.socket))
            .transpose()?;
        // The net device's socket is the one QEMU connects to by path
        // (see `command.rs`): its uid may reach that socket and nothing else.
        if let (Some(net), Some(identity)) = (&config.net, &identity) {
            grant_socket(&net.socket, identity.uid, identity.gid)?;
        }
        let fds = QemuFds {
            qmp: qmp_qemus.as_raw_fd(),
            console: console_qemus.as_raw_fd(),
            vsock: vsock.as_ref().map(AsRawFd::as_raw_fd),
            fs: fs.as_ref().map(AsRawFd::as_raw_fd),
        };
        let args = qemu_arguments(&config, accel.accel, &fds)?;
        let console = ConsoleLog::create(&config.console_log, config.console_max_bytes).map_err(
            |source| QemuError::CreateFile {
                path: config.console_log.clone(),
                source,
            },
        )?;
        tracing::info!(
            accel = %accel.accel,
            reason = %accel.reason,
            qemu = %binary.display(),
            %version,
            run_as = %identity.as_ref().map_or_else(|| "root".to_owned(), ToString::to_string),
            run_dir = %run_dir.path.display(),
            "starting a QEMU guest"
        );
        tracing::debug!(?args, "QEMU command line");
        let setup = ChildSetup {
            identity: identity
                .as_ref()
                .map(|id| (id.uid, id.gid, id.groups.clone())),
            inherit_fds: fds.all(),
        };
        let process = QemuProcess::spawn(&binary, &args, &run_dir.output_path(), setup)?;
        // QEMU holds its own copies now; ours would keep its peers from
        // seeing QEMU's end close.
        drop((qmp_qemus, console_qemus, vsock, fs));
        let mut vm = Self {
            process,
            qmp: None,
            run_dir,
            console,
            accel,
            version,
            quit_requested: false,
            end: None,
            identity,
            _uid_lease: uid_lease,
        };
        vm.qmp = Some(vm.connect_qmp(qmp_ours)?);
        vm.console
            .read_from(console_ours)
            .map_err(|source| QemuError::SocketPair {
                what: "serial console",
                source,
            })?;
        tracing::info!(pid = vm.pid(), "QEMU started; the guest is paused");
        Ok(PausedQemuVm { vm })
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The accelerator QEMU runs with, and why.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// Who QEMU runs as; `None` when it runs as root.
    pub fn identity(&self) -> Option<&QemuIdentity> {
        self.identity.as_ref()
    }

    /// The version of the QEMU that runs the guest.
    pub fn qemu_version(&self) -> QemuVersion {
        self.version
    }

    /// The VM's run directory (removed when the VM ends).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir.path
    }

    /// The file the guest's console is written to (the bytes before it are
    /// in `<file>.1`).
    pub fn console_log(&self) -> &Path {
        self.console.path()
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
        // QEMU is gone, so its end of the console socket is closed: what it
        // sent reaches the file, then the end of the console is evidence.
        let console_summary = self.console.finish(CONSOLE_DRAIN_PATIENCE);
        let console = read_tail(self.console.path(), CONSOLE_TAIL_BYTES);
        let console = String::from_utf8_lossy(&console);
        let qemu_output = tail(&read_lossy(&self.run_dir.output_path()), OUTPUT_TAIL_BYTES);
        let end = classify(EndEvidence {
            status,
            shutdown_reason: self.qmp.as_ref().and_then(QmpClient::last_shutdown_reason),
            quit_requested: self.quit_requested,
            console: &console,
            qemu_output: &qemu_output,
        });
        tracing::info!(
            pid = self.process.pid(),
            %status,
            ?end,
            console_dropped_bytes = console_summary.dropped_bytes,
            "QEMU guest ended"
        );
        self.qmp = None;
        self.run_dir.remove();
        self.end = Some(end.clone());
        end
    }

    /// Speaks QMP over the backend's end of the monitor's socket pair once
    /// QEMU greets on it; fails early with QEMU's output if QEMU exits
    /// first.
    fn connect_qmp(&mut self, stream: UnixStream) -> Result<QmpClient, QemuError> {
        let deadline = Instant::now() + QMP_STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.process.try_status() {
                return Err(self.exited_at_start(status));
            }
            // The greeting, or the end of the stream when QEMU exits.
            if readable_within(&stream, Duration::from_millis(10)) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Qmp {
                    source: QmpError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no greeting within {QMP_STARTUP_TIMEOUT:?}"),
                    )),
                });
            }
        }
        QmpClient::over(stream, QMP_IO_TIMEOUT).map_err(|source| {
            // A monitor that closed at once: QEMU is exiting.
            match self.process.wait_until(Instant::now() + QUIT_GRACE) {
                Some(status) if matches!(source, QmpError::Closed) => self.exited_at_start(status),
                _ => QemuError::Qmp { source },
            }
        })
    }

    fn exited_at_start(&self, status: std::process::ExitStatus) -> QemuError {
        let output = tail(&read_lossy(&self.run_dir.output_path()), OUTPUT_TAIL_BYTES);
        QemuError::ExitedAtStart { status, output }
    }
}

/// Whether `stream` has something to read (or reached its end) within
/// `timeout`.
fn readable_within(stream: &UnixStream, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
    ready > 0
}

/// Who QEMU runs as for `config` under `accel`, with the lease that holds
/// its uid; both `None` for root. Checks that the user can open the guest
/// kernel, the initramfs and, under KVM, `/dev/kvm`.
/// Lets `uid` connect to the Unix socket `socket` and nothing more: its
/// directory (the pod's 0700 VM directory) gets an ACL entry giving `uid`
/// search (x) permission only, so the uid can neither list it nor open
/// anything whose own mode refuses it, and the socket becomes the uid's,
/// mode 0600 (connecting needs write permission on it).
fn grant_socket(socket: &Path, uid: u32, gid: u32) -> Result<(), QemuError> {
    let not_granted = |path: &Path, source: std::io::Error| QemuError::CreateFile {
        path: path.to_owned(),
        source: std::io::Error::new(
            source.kind(),
            format!("cannot let QEMU's uid {uid} reach the socket: {source}"),
        ),
    };
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let mode = std::fs::metadata(dir)
        .map_err(|e| not_granted(dir, e))?
        .permissions()
        .mode();
    // posix_acl_xattr_header and entries (linux/posix_acl_xattr.h): the
    // owner's bits from the mode, uid search only, no group, mask x, no
    // other.
    const UNDEFINED_ID: u32 = u32::MAX;
    let entry = |tag: u16, perm: u16, id: u32| {
        let mut bytes = tag.to_le_bytes().to_vec();
        bytes.extend_from_slice(&perm.to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes
    };
    let mut acl = 2u32.to_le_bytes().to_vec();
    acl.extend(entry(0x01, ((mode >> 6) & 7) as u16, UNDEFINED_ID));
    acl.extend(entry(0x02, 1, uid));
    acl.extend(entry(0x04, 0, UNDEFINED_ID));
    acl.extend(entry(0x10, 1, UNDEFINED_ID));
    acl.extend(entry(0x20, 0, UNDEFINED_ID));
    xattr_set(dir, "system.posix_acl_access", &acl).map_err(|e| not_granted(dir, e))?;
    std::os::unix::fs::chown(socket, Some(uid), Some(gid)).map_err(|e| not_granted(socket, e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| not_granted(socket, e))
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and `value` lives across the
    // call, which reads `value.len()` bytes of it.
    let result = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn choose_identity(
    config: &QemuVmConfig,
    accel: ResolvedAccel,
) -> Result<(Option<UidLease>, Option<QemuIdentity>), QemuError> {
    let RunAs::Unprivileged(range) = config.run_as else {
        return Ok((None, None));
    };
    let lease = UidLease::take(
        range,
        &config.work_dir,
        &super::identity::lease_directory(),
        ID_RANGE_SETTING,
    )?;
    let mut identity = lease.identity().clone();
    if accel == ResolvedAccel::Kvm {
        let kvm = Path::new(KVM_DEVICE);
        identity.allow_kvm(kvm, RUN_AS_SETTING)?;
        identity.check_access("KVM device", kvm, true, RUN_AS_SETTING)?;
    }
    identity.check_access(
        "guest kernel",
        &config.kernel,
        false,
        "hypervisor.qemu_kernel",
    )?;
    identity.check_access("initramfs", &config.initrd, false, "hypervisor.initrd")?;
    Ok((Some(lease), Some(identity)))
}

/// A QEMU guest that was started with its vCPUs stopped (`-S`): QEMU runs,
/// its QMP monitor answers and its console is connected, but no guest
/// instruction ran. [`PausedQemuVm::resume`] sends QMP `cont`; dropping it
/// instead kills and reaps QEMU, so the guest never runs.
#[derive(Debug)]
pub struct PausedQemuVm {
    vm: QemuVm,
}

impl PausedQemuVm {
    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Lets the guest run (QMP `cont`).
    pub fn resume(mut self) -> Result<QemuVm, QemuError> {
        let qmp = self.vm.qmp.as_mut().ok_or(QemuError::Resume {
            source: QmpError::Closed,
        })?;
        qmp.execute("cont", None)
            .map_err(|source| QemuError::Resume { source })?;
        tracing::info!(pid = self.vm.pid(), "QEMU guest resumed");
        Ok(self.vm)
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
    /// Creates `<work_dir>/q-<pid>-<n>` (short: its sockets must fit a Unix
    /// socket address), readable by the owner only.
    fn create(work_dir: &Path) -> Result<Self, QemuError> {
        loop {
            let sequence = NEXT_VM_SEQUENCE.fetch_add(1, Ordering::Relaxed);
            let path = work_dir.join(format!("q-{}-{sequence}", std::process::id()));
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
            // Not about identities (`pod_vm.rs` and `identity.rs` are).
            .with_run_as(RunAs::Root)
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
