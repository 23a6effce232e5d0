//! A built microVM and its life: start the vCPU threads, wait for the guest
//! to end (or a deadline), stop, and report how it ended.
//!
//! Stopping is always complete: every vCPU thread is kicked out of
//! `KVM_RUN` and joined before `stop` returns, so no thread outlives the VM.
//! Pausing is the same kick, but each thread hands its vCPU back, and the
//! virtio devices stop their workers: then [`MicroVm::snapshot`] can save
//! the whole machine and [`MicroVm::resume`] goes on (see
//! [`crate::snapshot`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_devices::MmioTransport;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::builder::LegacyDevices;
use crate::snapshot::{SnapshotError, SnapshotSummary};
use crate::vstate::vcpu::{Vcpu, VcpuShared, VmExit, VCPU_KICK_SIGNAL_OFFSET};
use crate::vstate::vm::Vm;

/// How often a stopping VM re-kicks vCPUs that have not left `KVM_RUN`
/// (a kick can land just before a thread re-enters the guest).
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Timings of one VM's boot, all measured from VM creation.
#[derive(Debug, Clone, Default)]
pub struct BootReport {
    /// Until vCPU 0 first entered the guest.
    pub first_vcpu_entry: Option<Duration>,
    /// Until the guest's init wrote to the boot timer.
    pub init_reached: Option<Duration>,
}

/// A VM that has been built but not started, or has been started.
pub struct MicroVm {
    vm: Vm,
    /// vCPUs not running: before `start`, and while paused.
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<Vcpu>>,
    shared: Arc<VcpuShared>,
    legacy: LegacyDevices,
    created_at: Instant,
    guest_cmdline: Option<String>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The MSRs a snapshot saves (KVM's index list).
    msr_indices: Vec<u32>,
    paused: bool,
}

/// Errors while running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error("the VM is paused: resume it rather than start it")]
    Paused,
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    SpawnVcpu { index: u8, source: std::io::Error },
    #[error("cannot wait for the VM's events: {0}")]
    Poll(std::io::Error),
    #[error("the VM is not running: start it before pausing it")]
    NotRunning,
    #[error("the VM is not paused: there is nothing to resume")]
    NotPaused,
    #[error("the VM ended while it was being paused: {0}")]
    EndedWhilePausing(VmExit),
    #[error(transparent)]
    Device(#[from] husk_devices::PauseError),
    #[error("cannot resume a virtio device: {0}")]
    ResumeDevice(#[from] husk_devices::MmioError),
}

impl MicroVm {
    #[allow(clippy::too_many_arguments)] // internal constructor used by the builder only
    pub(crate) fn new(
        vm: Vm,
        vcpus: Vec<Vcpu>,
        shared: Arc<VcpuShared>,
        legacy: LegacyDevices,
        created_at: Instant,
        guest_cmdline: Option<String>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        msr_indices: Vec<u32>,
    ) -> Self {
        Self {
            vm,
            vcpus,
            threads: Vec::new(),
            shared,
            legacy,
            created_at,
            guest_cmdline,
            transports,
            msr_indices,
            paused: false,
        }
    }

    /// The guest memory (tests inspect it; the bench measures it).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// The command line the guest kernel received, for Linux boots.
    pub fn guest_cmdline(&self) -> Option<&str> {
        self.guest_cmdline.as_deref()
    }

    /// The virtio-mmio transports, in device order.
    pub fn virtio_transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// Host address ranges backing guest memory: `(start, length)`.
    pub fn guest_memory_host_ranges(&self) -> Vec<(usize, usize)> {
        self.vm
            .memory()
            .iter()
            .map(|region| (region.as_ptr() as usize, region.len() as usize))
            .collect()
    }

    /// Boot timings so far.
    pub fn boot_report(&self) -> BootReport {
        BootReport {
            first_vcpu_entry: self
                .shared
                .first_entry
                .get()
                .map(|entered| entered.duration_since(self.created_at)),
            init_reached: self.legacy.boot_timing.init_reached_after(),
        }
    }

    /// Spawns one thread per vCPU.
    pub fn start(&mut self) -> Result<(), RunError> {
        if self.paused {
            return Err(RunError::Paused);
        }
        if self.vcpus.is_empty() {
            return Err(RunError::AlreadyStarted);
        }
        self.spawn_vcpu_threads()
    }

    fn spawn_vcpu_threads(&mut self) -> Result<(), RunError> {
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        let vcpus: Vec<Vcpu> = self.vcpus.drain(..).collect();
        for vcpu in vcpus {
            let index = vcpu.index;
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("husk-vcpu{index}"))
                .spawn(move || vcpu.run_loop(&shared));
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(source) => {
                    self.stop();
                    return Err(RunError::SpawnVcpu { index, source });
                }
            }
        }
        Ok(())
    }

    /// Waits until the guest ends the VM or `deadline` passes; returns the
    /// reason, or `None` on deadline (the VM keeps running).
    pub fn wait(&self, deadline: Option<Duration>) -> Result<Option<VmExit>, RunError> {
        let started = Instant::now();
        loop {
            if self.legacy.reset_event.read().is_ok() {
                self.shared.report_exit(VmExit::Reset);
            }
            if let Some(reason) = self.exit_reason() {
                return Ok(Some(reason));
            }
            let remaining_ms = match deadline {
                Some(deadline) => match deadline.checked_sub(started.elapsed()) {
                    Some(remaining) => remaining.as_millis().clamp(1, i32::MAX as u128) as i32,
                    None => return Ok(None),
                },
                None => -1,
            };
            let mut fds = [
                libc::pollfd {
                    fd: std::os::unix::io::AsRawFd::as_raw_fd(&self.legacy.reset_event),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: std::os::unix::io::AsRawFd::as_raw_fd(&self.shared.exit_event),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the call.
            let ready =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, remaining_ms) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RunError::Poll(error));
                }
            }
        }
    }

    fn exit_reason(&self) -> Option<VmExit> {
        self.shared
            .exit_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops every vCPU and joins its thread; returns why the VM ended
    /// (`Stopped` if the guest was still running).
    pub fn stop(&mut self) -> VmExit {
        self.shared.report_exit(VmExit::Stopped);
        // The vCPUs handed back are dropped with the VM.
        let _ = self.kick_and_join();
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.exit_reason().unwrap_or(VmExit::Stopped)
    }

    /// Kicks every vCPU thread until it has left its run loop, joins it
    /// and returns the vCPUs the threads handed back.
    fn kick_and_join(&mut self) -> Vec<Vcpu> {
        let signal = vmm_sys_util::signal::SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET;
        let mut handed_back = Vec::new();
        for handle in self.threads.drain(..) {
            while !handle.is_finished() {
                if let Err(error) = handle.kill(signal) {
                    tracing::warn!(%error, "cannot kick a vCPU thread");
                }
                std::thread::sleep(KICK_INTERVAL);
            }
            match handle.join() {
                Ok(vcpu) => handed_back.push(vcpu),
                Err(_) => tracing::error!("a vCPU thread panicked"),
            }
        }
        handed_back
    }

    /// Pauses a running VM: every vCPU leaves the guest with the I/O it
    /// exited for completed, and every activated virtio device stops its
    /// worker with its queues where they stand. The guest sees nothing;
    /// [`MicroVm::resume`] continues it. A device that cannot pause makes
    /// the pause fail, and the VM is resumed.
    pub fn pause(&mut self) -> Result<(), RunError> {
        if self.paused || self.threads.is_empty() {
            return Err(RunError::NotRunning);
        }
        self.shared.pause_requested.store(true, Ordering::SeqCst);
        let mut vcpus = self.kick_and_join();
        vcpus.sort_by_key(|vcpu| vcpu.index);
        self.vcpus = vcpus;
        self.paused = true;
        if let Some(reason) = self.exit_reason() {
            return Err(RunError::EndedWhilePausing(reason));
        }
        for (index, transport) in self.transports.iter().enumerate() {
            let paused = transport.lock().unwrap_or_else(|p| p.into_inner()).pause();
            if let Err(error) = paused {
                // Devices paused so far go on, the failing one too if it
                // had stopped; so does the guest.
                for earlier in &self.transports[..=index] {
                    if let Err(resume_error) =
                        earlier.lock().unwrap_or_else(|p| p.into_inner()).resume()
                    {
                        tracing::error!(%resume_error, "cannot resume a virtio device after a failed pause");
                    }
                }
                self.paused = false;
                self.spawn_vcpu_threads()?;
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Continues a paused VM: devices first, so nothing the guest does
    /// finds them stopped, then the vCPUs.
    pub fn resume(&mut self) -> Result<(), RunError> {
        if !self.paused {
            return Err(RunError::NotPaused);
        }
        for transport in &self.transports {
            transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume()?;
        }
        self.paused = false;
        self.spawn_vcpu_threads()
    }

    /// Saves a paused VM into `directory`, which must not exist yet: the
    /// KVM state of the VM and its vCPUs, the console's and the virtio
    /// transports' registers, and guest RAM (see [`crate::snapshot`]).
    /// The VM stays paused; resume it, or drop it.
    pub fn snapshot(&self, directory: &std::path::Path) -> Result<SnapshotSummary, SnapshotError> {
        if !self.paused {
            return Err(SnapshotError::NotPaused);
        }
        crate::snapshot::save(crate::snapshot::SnapshotSource {
            vm: &self.vm,
            vcpus: &self.vcpus,
            msr_indices: &self.msr_indices,
            serial: &self.legacy.serial,
            transports: &self.transports,
            guest_cmdline: self.guest_cmdline.as_deref(),
            directory,
        })
    }

    /// Starts the VM, waits for it to end or for `deadline`, stops it.
    pub fn run(mut self, deadline: Option<Duration>) -> Result<(VmExit, BootReport), RunError> {
        self.start()?;
        let waited = self.wait(deadline);
        let reason = match waited {
            Ok(Some(_)) => self.stop(),
            Ok(None) => {
                self.shared.report_exit(VmExit::Timeout);
                self.stop()
            }
            Err(error) => {
                self.stop();
                return Err(error);
            }
        };
        Ok((reason, self.boot_report()))
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}
