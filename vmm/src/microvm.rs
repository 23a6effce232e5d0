//! A built microVM and its life: start the vCPU threads, wait for the guest
//! to end (or a deadline), stop, and report how it ended.
//!
//! Stopping is always complete: every vCPU thread is kicked out of
//! `KVM_RUN` and joined before `stop` returns, so no thread outlives the VM.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_devices::MmioTransport;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::devices::boot_timer::BootTiming;
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
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<VcpuShared>,
    reset_event: EventFd,
    boot_timing: BootTiming,
    created_at: Instant,
    guest_cmdline: Option<String>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Errors while running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    SpawnVcpu { index: u8, source: std::io::Error },
    #[error("cannot wait for the VM's events: {0}")]
    Poll(std::io::Error),
}

impl MicroVm {
    #[allow(clippy::too_many_arguments)] // internal constructor used by the builder only
    pub(crate) fn new(
        vm: Vm,
        vcpus: Vec<Vcpu>,
        shared: Arc<VcpuShared>,
        reset_event: EventFd,
        boot_timing: BootTiming,
        created_at: Instant,
        guest_cmdline: Option<String>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
    ) -> Self {
        Self {
            vm,
            vcpus,
            threads: Vec::new(),
            shared,
            reset_event,
            boot_timing,
            created_at,
            guest_cmdline,
            transports,
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
            init_reached: self.boot_timing.init_reached_after(),
        }
    }

    /// Spawns one thread per vCPU.
    pub fn start(&mut self) -> Result<(), RunError> {
        if self.vcpus.is_empty() {
            return Err(RunError::AlreadyStarted);
        }
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
            if self.reset_event.read().is_ok() {
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
                    fd: std::os::unix::io::AsRawFd::as_raw_fd(&self.reset_event),
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
        let signal = vmm_sys_util::signal::SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET;
        for handle in self.threads.drain(..) {
            while !handle.is_finished() {
                if let Err(error) = handle.kill(signal) {
                    tracing::warn!(%error, "cannot kick a vCPU thread");
                }
                std::thread::sleep(KICK_INTERVAL);
            }
            if handle.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.exit_reason().unwrap_or(VmExit::Stopped)
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
