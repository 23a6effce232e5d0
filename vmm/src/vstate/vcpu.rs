//! vCPU threads: each vCPU runs `KVM_RUN` in a loop on its own host thread
//! and dispatches port-I/O and MMIO exits to the VM's buses.
//!
//! A vCPU stops when the guest ends the VM (triple fault, system event), when
//! KVM reports an error, or when the VMM sets the shared stop flag and kicks
//! the thread with [`VCPU_KICK_SIGNAL`], which makes `KVM_RUN` return EINTR.
//! The first stop reason wins and is reported through an eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::Bus;

/// Real-time signal offset used to kick vCPU threads out of `KVM_RUN`.
pub const VCPU_KICK_SIGNAL_OFFSET: i32 = 0;

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042 (`reboot=k`): the way a
    /// husk guest powers off.
    Reset,
    /// The VMM was asked to stop the VM.
    Stopped,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { vcpu: u8 },
    /// The guest raised a KVM system event (shutdown, reset, crash).
    SystemEvent { vcpu: u8, event_type: u32 },
    /// KVM could not emulate or continue the guest (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError { vcpu: u8, suberror: u32 },
    /// KVM could not enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry { vcpu: u8, hardware_reason: u64 },
    /// `KVM_RUN` itself failed.
    RunFailed { vcpu: u8, error: String },
    /// The run deadline passed before the guest ended.
    Timeout,
}

impl VmExit {
    /// Whether the guest ended the way a healthy guest does.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Stopped)
    }

    /// The exit status `husk-vmm` reports for this ending.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Stopped => 0,
            VmExit::TripleFault { .. } => 2,
            VmExit::InternalError { .. } => 3,
            VmExit::FailEntry { .. } => 4,
            VmExit::SystemEvent { .. } => 5,
            VmExit::RunFailed { .. } => 6,
            VmExit::Timeout => 124,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset the VM (i8042 CPU reset): clean power-off"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
            VmExit::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)")
            }
            VmExit::SystemEvent { vcpu, event_type } => {
                write!(f, "vCPU {vcpu} raised KVM system event {event_type}")
            }
            VmExit::InternalError { vcpu, suberror } => {
                write!(f, "KVM internal error on vCPU {vcpu} (suberror {suberror})")
            }
            VmExit::FailEntry {
                vcpu,
                hardware_reason,
            } => {
                write!(
                    f,
                    "KVM failed to enter vCPU {vcpu} (hardware reason {hardware_reason:#x})"
                )
            }
            VmExit::RunFailed { vcpu, error } => {
                write!(f, "KVM_RUN failed on vCPU {vcpu}: {error}")
            }
            VmExit::Timeout => write!(f, "the run deadline passed"),
        }
    }
}

/// State every vCPU thread of one VM shares.
pub struct VcpuShared {
    pub pio_bus: Bus,
    pub mmio_bus: Bus,
    /// Set to ask every vCPU to leave its run loop.
    pub stop_requested: AtomicBool,
    /// Set to ask every vCPU to leave its run loop and hand itself back,
    /// its state whole, for a snapshot (`MicroVm::pause`).
    pub pause_requested: AtomicBool,
    /// The first reason any vCPU stopped for.
    pub exit_reason: Mutex<Option<VmExit>>,
    /// Signalled when `exit_reason` is set.
    pub exit_event: EventFd,
    /// When vCPU 0 first entered the guest.
    pub first_entry: OnceLock<Instant>,
}

impl VcpuShared {
    /// Records `reason` unless another one was recorded first, asks all
    /// vCPUs to stop, and wakes the VMM.
    pub fn report_exit(&self, reason: VmExit) {
        let mut recorded = self.exit_reason.lock().unwrap_or_else(|p| p.into_inner());
        if recorded.is_none() {
            tracing::info!(%reason, "VM is stopping");
            *recorded = Some(reason);
        }
        self.stop_requested.store(true, Ordering::SeqCst);
        if let Err(error) = self.exit_event.write(1) {
            tracing::error!(%error, "cannot signal the VM exit event");
        }
    }
}

/// One vCPU, ready to run.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

/// The empty handler of [`VCPU_KICK_SIGNAL_OFFSET`]: its only job is to
/// interrupt `KVM_RUN`.
extern "C" fn handle_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler (idempotent; done once per process).
pub fn install_kick_signal_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let signal = vmm_sys_util::signal::SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET;
        vmm_sys_util::signal::register_signal_handler(signal, handle_kick_signal)
            .map_err(|e| e.errno())
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

impl Vcpu {
    /// Runs the guest until the VM stops or pauses; executed on the vCPU's
    /// thread, which hands the vCPU back when it ends.
    pub fn run_loop(mut self, shared: &VcpuShared) -> Vcpu {
        let vcpu = self.index;
        // Confined before the guest runs a single instruction on this vCPU;
        // a vCPU that cannot be confined never enters the guest.
        if let Err(error) = husk_confine::confine_current_thread(husk_confine::ThreadClass::Vcpu) {
            shared.report_exit(VmExit::RunFailed {
                vcpu,
                error: error.to_string(),
            });
            return self;
        }
        while !shared.stop_requested.load(Ordering::SeqCst)
            && !shared.pause_requested.load(Ordering::SeqCst)
        {
            if vcpu == 0 {
                shared.first_entry.get_or_init(Instant::now);
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    shared.pio_bus.write(u64::from(port), data);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !shared.pio_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(address, data)) => {
                    if !shared.mmio_bus.write(address, data) {
                        tracing::debug!(address, "guest wrote to unclaimed MMIO");
                    }
                }
                Ok(VcpuExit::MmioRead(address, data)) => {
                    if !shared.mmio_bus.read(address, data) {
                        data.fill(0xff);
                    }
                }
                // With the in-kernel irqchip, HLT never reaches user space
                // except on the rare host where it does; just re-enter.
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => shared.report_exit(VmExit::TripleFault { vcpu }),
                Ok(VcpuExit::SystemEvent(event_type, _)) => {
                    shared.report_exit(VmExit::SystemEvent { vcpu, event_type })
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel
                    // filled the `internal` member of the exit union.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    shared.report_exit(VmExit::InternalError { vcpu, suberror })
                }
                Ok(VcpuExit::FailEntry(hardware_reason, _)) => {
                    shared.report_exit(VmExit::FailEntry {
                        vcpu,
                        hardware_reason,
                    })
                }
                Ok(other) => {
                    tracing::warn!(vcpu, exit = ?other, "unhandled vCPU exit, re-entering");
                }
                Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                    // Kicked: the loop condition decides whether to go on.
                }
                Err(error) => shared.report_exit(VmExit::RunFailed {
                    vcpu,
                    error: error.to_string(),
                }),
            }
        }
        if !shared.stop_requested.load(Ordering::SeqCst) {
            self.complete_pending_io();
        }
        self
    }

    /// Finishes the exit the vCPU last left `KVM_RUN` for. KVM completes
    /// a port or MMIO read (the value user space put in `kvm_run`) only on
    /// the next `KVM_RUN`; with `immediate_exit` set that call completes it
    /// and returns at once without running the guest, so the registers a
    /// snapshot reads are whole.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(error) if error.errno() == libc::EINTR => {}
            other => {
                tracing::debug!(vcpu = self.index, outcome = ?other.map(|_| ()), "KVM_RUN with immediate_exit")
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}
