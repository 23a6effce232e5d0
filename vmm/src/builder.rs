//! `VmBuilder`: the library API that turns a configuration (kernel, initrd,
//! command line, vCPUs, memory, devices) into a [`MicroVm`] ready to run.
//!
//! Every input is validated before any host resource is taken, so bad input
//! fails fast with an error naming what was wrong; later failures drop what
//! was built so far (threads are only spawned by `MicroVm::start`).

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use husk_arch::{BootProtocol, LinuxBootConfig};
use husk_devices::{MmioError, MmioTransport, VirtioDevice, QUEUE_NOTIFY_OFFSET};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::boot_timer::{BootTimer, BootTiming, BOOT_TIMER_PORT};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{self, EventFdTrigger, SerialConsole, SerialSink, I8042};
use crate::loader::{self, BootProtocolChoice, LoadError, MmioDeviceSlot};
use crate::microvm::MicroVm;
use crate::vstate::vcpu::{Vcpu, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

/// The default device node of KVM.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";
/// The command line used when the caller gives none: console on COM1, early
/// console too (so a guest that dies early still says why), reboot through
/// the i8042 (our power-off), and reboot at once on panic.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 8250.nr_uarts=1 quiet";

/// What the vCPUs execute first.
pub enum BootSource {
    /// A Linux kernel (ELF vmlinux or bzImage), optional initrd, command line.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        protocol: BootProtocolChoice,
    },
    /// Flat 32-bit code copied to `load_address` and entered in protected
    /// mode with flat 4 GiB segments and paging off (the PVH entry state,
    /// EBX = 0). For tests and diagnostics: it can reach every port and
    /// every MMIO window.
    FlatImage { image: Vec<u8>, load_address: u64 },
    /// A snapshot directory written by [`MicroVm::snapshot`]: the VM
    /// continues where the snapshot was taken (see [`crate::snapshot`]).
    Snapshot { directory: PathBuf },
}

/// Errors from building a microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no boot source: set a kernel (or a real-mode image)")]
    NoBootSource,
    #[error("a VM needs at least one vCPU (0 requested)")]
    NoVcpus,
    #[error("{requested} vCPUs requested; the MP table supports at most {max}")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("{requested_mib} MiB of guest memory requested; at least {min_mib} MiB are needed")]
    TooLittleMemory { requested_mib: u64, min_mib: u64 },
    #[error("invalid guest memory size {requested_mib} MiB: {detail}")]
    MemoryLayout { requested_mib: u64, detail: String },
    #[error("cannot allocate {requested_mib} MiB of guest memory: {detail}")]
    MemoryAllocation { requested_mib: u64, detail: String },
    #[error("the kernel image {path} does not exist")]
    KernelMissing { path: PathBuf },
    #[error("the initrd {path} does not exist")]
    InitrdMissing { path: PathBuf },
    #[error("cannot open {path}: {source} (is KVM available and are you allowed to use it?)")]
    KvmUnavailable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("KVM at {path} speaks API version {version}; version 12 is required")]
    KvmApiVersion { path: PathBuf, version: i32 },
    #[error("{count} virtio devices requested; only {max} interrupt lines are free")]
    TooManyDevices { count: usize, max: usize },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot write the {what}: {detail}")]
    BootStructure { what: &'static str, detail: String },
    #[error("cannot set up vCPU {index}: {detail}")]
    Vcpu { index: u8, detail: String },
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(std::io::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Builds a [`MicroVm`].
pub struct VmBuilder {
    boot: Option<BootSource>,
    vcpus: u32,
    memory_mib: u64,
    serial: SerialSink,
    devices: Vec<Box<dyn VirtioDevice>>,
    kvm_path: PathBuf,
}

impl Default for VmBuilder {
    fn default() -> Self {
        Self {
            boot: None,
            vcpus: 1,
            memory_mib: 128,
            serial: SerialSink::Stdout,
            devices: Vec::new(),
            kvm_path: PathBuf::from(DEFAULT_KVM_PATH),
        }
    }
}

impl VmBuilder {
    /// A builder with 1 vCPU, 128 MiB, console on stdout, no devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Boots a Linux kernel with the given command line (see
    /// [`DEFAULT_CMDLINE`]) and optional initrd.
    pub fn linux(
        mut self,
        kernel: impl Into<PathBuf>,
        initrd: Option<PathBuf>,
        cmdline: impl Into<String>,
    ) -> Self {
        self.boot = Some(BootSource::Linux {
            kernel: kernel.into(),
            initrd,
            cmdline: cmdline.into(),
            protocol: BootProtocolChoice::Auto,
        });
        self
    }

    /// Chooses the entry protocol of a Linux boot source.
    pub fn boot_protocol(mut self, choice: BootProtocolChoice) -> Self {
        if let Some(BootSource::Linux { protocol, .. }) = &mut self.boot {
            *protocol = choice;
        }
        self
    }

    /// Boots a flat 32-bit protected-mode image instead of Linux.
    pub fn flat_image(mut self, image: Vec<u8>, load_address: u64) -> Self {
        self.boot = Some(BootSource::FlatImage {
            image,
            load_address,
        });
        self
    }

    pub fn vcpus(mut self, count: u32) -> Self {
        self.vcpus = count;
        self
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Where the guest console goes.
    pub fn serial(mut self, sink: SerialSink) -> Self {
        self.serial = sink;
        self
    }

    /// Adds a virtio device behind a virtio-mmio window.
    pub fn virtio_device(mut self, device: Box<dyn VirtioDevice>) -> Self {
        self.devices.push(device);
        self
    }

    /// Restores the VM a snapshot directory holds instead of booting one.
    /// The snapshot decides the vCPUs, the memory and the guest; the
    /// builder gives the console and the virtio devices, which must be of
    /// the same types in the same order as when it was taken.
    pub fn restore_snapshot(mut self, directory: impl Into<PathBuf>) -> Self {
        self.boot = Some(BootSource::Snapshot {
            directory: directory.into(),
        });
        self
    }

    /// Uses another KVM device node (tests of a missing `/dev/kvm`).
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        let boot = self.boot.as_ref().ok_or(BuildError::NoBootSource)?;
        if let BootSource::Snapshot { directory } = boot {
            if !directory.is_dir() {
                return Err(crate::snapshot::SnapshotError::Missing {
                    path: directory.clone(),
                }
                .into());
            }
            return Ok(());
        }
        if self.vcpus == 0 {
            return Err(BuildError::NoVcpus);
        }
        if self.vcpus > husk_arch::MAX_SUPPORTED_CPUS {
            return Err(BuildError::TooManyVcpus {
                requested: self.vcpus,
                max: husk_arch::MAX_SUPPORTED_CPUS,
            });
        }
        if self.memory_mib < husk_arch::MIN_GUEST_MEMORY_MIB {
            return Err(BuildError::TooLittleMemory {
                requested_mib: self.memory_mib,
                min_mib: husk_arch::MIN_GUEST_MEMORY_MIB,
            });
        }
        let free_irqs = (husk_arch::IRQ_MAX - husk_arch::IRQ_BASE + 1) as usize;
        if self.devices.len() > free_irqs {
            return Err(BuildError::TooManyDevices {
                count: self.devices.len(),
                max: free_irqs,
            });
        }
        if let BootSource::Linux { kernel, initrd, .. } = boot {
            if !kernel.exists() {
                return Err(BuildError::KernelMissing {
                    path: kernel.clone(),
                });
            }
            if let Some(initrd) = initrd.as_ref().filter(|p| !p.exists()) {
                return Err(BuildError::InitrdMissing {
                    path: initrd.clone(),
                });
            }
        }
        Ok(())
    }

    fn open_kvm(&self) -> Result<Kvm, BuildError> {
        let unavailable = |source| BuildError::KvmUnavailable {
            path: self.kvm_path.clone(),
            source,
        };
        let path = std::ffi::CString::new(self.kvm_path.as_os_str().as_bytes())
            .map_err(|_| unavailable(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        let kvm = Kvm::new_with_path(&path)
            .map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(BuildError::KvmApiVersion {
                path: self.kvm_path.clone(),
                version,
            });
        }
        Ok(kvm)
    }

    /// Validates the configuration, then creates the VM, loads the guest and
    /// sets up devices and vCPUs. No thread runs until `MicroVm::start`.
    pub fn build(mut self) -> Result<MicroVm, BuildError> {
        self.validate()?;
        let created_at = Instant::now();
        let kvm = self.open_kvm()?;
        if let Some(BootSource::Snapshot { directory }) = &self.boot {
            let directory = directory.clone();
            let devices = std::mem::take(&mut self.devices);
            let serial = std::mem::replace(&mut self.serial, SerialSink::Null);
            return crate::snapshot::restore(&kvm, &directory, devices, serial, created_at);
        }
        let requested_mib = self.memory_mib;
        let regions = husk_arch::guest_memory_regions(requested_mib << 20).map_err(|e| {
            BuildError::MemoryLayout {
                requested_mib,
                detail: e.to_string(),
            }
        })?;
        let memory =
            GuestMemoryMmap::from_ranges(&regions).map_err(|e| BuildError::MemoryAllocation {
                requested_mib,
                detail: e.to_string(),
            })?;
        let vm = Vm::new(&kvm, memory)?;
        // Attach guest memory to KVM on a helper thread while the guest is
        // loaded and the devices and vCPUs are set up: neither needs the
        // slots, only KVM_RUN does.
        let (assembled, slots) = std::thread::scope(|scope| {
            let slots = scope.spawn(|| vm.register_memory_slots());
            let assembled = self.assemble(&kvm, &vm, created_at);
            (assembled, slots.join())
        });
        match slots {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        let parts = assembled?;
        tracing::debug!(
            elapsed_us = created_at.elapsed().as_micros() as u64,
            "memory slots attached, VM ready"
        );
        let msr_indices = crate::snapshot::msr_indices(&kvm);
        Ok(MicroVm::new(
            vm,
            parts.vcpus,
            parts.shared,
            parts.legacy,
            created_at,
            parts.guest_cmdline,
            parts.transports,
            msr_indices,
        ))
    }

    /// Everything after the VM exists: devices, guest image, legacy devices
    /// and vCPUs.
    fn assemble(self, kvm: &Kvm, vm: &Vm, created_at: Instant) -> Result<AssembledVm, BuildError> {
        let vcpu_count = self.vcpus as u8; // validated against MAX_SUPPORTED_CPUS (< 256)

        // Devices: virtio-mmio windows first, so the command line lists them.
        let mut mmio_bus = Bus::new();
        let mut device_slots = Vec::new();
        let mut transports = Vec::new();
        for (index, device) in self.devices.into_iter().enumerate() {
            let (transport, slot) = place_transport(vm, &mut mmio_bus, index, |memory, irqfd| {
                MmioTransport::new(device, memory, irqfd)
            })?;
            transports.push(transport);
            device_slots.push(slot);
        }

        let boot_entry = match self.boot.ok_or(BuildError::NoBootSource)? {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
                protocol,
            } => load_linux(
                vm,
                vcpu_count,
                &kernel,
                initrd.as_deref(),
                &cmdline,
                protocol,
                &device_slots,
            )?,
            BootSource::Snapshot { .. } => return Err(BuildError::NoBootSource),
            BootSource::FlatImage {
                image,
                load_address,
            } => {
                vm.memory()
                    .write_slice(&image, GuestAddress(load_address))
                    .map_err(|e| BuildError::BootStructure {
                        what: "flat image",
                        detail: format!("at {load_address:#x}: {e}"),
                    })?;
                BootEntry {
                    entry: GuestAddress(load_address),
                    protocol: BootProtocol::Pvh,
                    boot_info: GuestAddress(0),
                    cmdline: None,
                }
            }
        };

        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|source| BuildError::EventFd {
            what: "the serial interrupt",
            source,
        })?;
        vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)?;
        let serial = SerialConsole::new(EventFdTrigger(serial_irq), self.serial);
        let legacy = LegacyDevices::new(serial, created_at)?;

        let vcpus = create_vcpus(kvm, vm, vcpu_count, &boot_entry)?;
        let shared = vcpu_shared(legacy.pio_bus()?, mmio_bus)?;
        Ok(AssembledVm {
            vcpus,
            shared,
            legacy,
            guest_cmdline: boot_entry.cmdline,
            transports,
        })
    }
}

/// Puts the virtio-mmio transport `make` builds in window `index`: its
/// interrupt line as an irqfd, its queue notifications as ioeventfds, its
/// registers on the MMIO bus.
pub(crate) fn place_transport(
    vm: &Vm,
    mmio_bus: &mut Bus,
    index: usize,
    make: impl FnOnce(GuestMemoryMmap, EventFd) -> Result<MmioTransport, MmioError>,
) -> Result<(Arc<Mutex<MmioTransport>>, MmioDeviceSlot), BuildError> {
    let slot = MmioDeviceSlot {
        base: husk_arch::VIRTIO_MMIO_BASE + index as u64 * husk_arch::VIRTIO_MMIO_WINDOW_SIZE,
        size: husk_arch::VIRTIO_MMIO_WINDOW_SIZE,
        irq: husk_arch::IRQ_BASE + index as u32,
    };
    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|source| BuildError::EventFd {
        what: "a virtio interrupt",
        source,
    })?;
    vm.register_irqfd(&irqfd, slot.irq)?;
    let transport = make(vm.memory().clone(), irqfd)?;
    for (queue_index, notifier) in transport.queue_notifiers().iter().enumerate() {
        vm.register_mmio_ioeventfd(
            notifier,
            slot.base + QUEUE_NOTIFY_OFFSET,
            queue_index as u32,
        )?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus.insert(transport.clone(), slot.base, slot.size)?;
    Ok((transport, slot))
}

/// The legacy devices of a VM and the handles the VMM keeps on them: the
/// console (a snapshot saves its registers), the i8042's reset event and
/// the boot timer.
pub(crate) struct LegacyDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub reset_event: EventFd,
    pub reset_trigger: EventFd,
    pub boot_timing: BootTiming,
    pub created_at: Instant,
}

impl LegacyDevices {
    pub(crate) fn new(serial: SerialConsole, created_at: Instant) -> Result<Self, BuildError> {
        let reset_event = EventFd::new(EFD_NONBLOCK).map_err(|source| BuildError::EventFd {
            what: "the reset event",
            source,
        })?;
        let reset_trigger = reset_event
            .try_clone()
            .map_err(|source| BuildError::EventFd {
                what: "the reset event",
                source,
            })?;
        Ok(Self {
            serial: Arc::new(Mutex::new(serial)),
            reset_event,
            reset_trigger,
            boot_timing: BootTiming::default(),
            created_at,
        })
    }

    /// The port-I/O bus: COM1, the i8042 and the boot timer.
    pub(crate) fn pio_bus(&self) -> Result<Bus, BuildError> {
        let mut pio_bus = Bus::new();
        pio_bus.insert(
            self.serial.clone(),
            legacy::COM1_PORT,
            legacy::COM1_PORT_COUNT,
        )?;
        let reset_trigger =
            self.reset_trigger
                .try_clone()
                .map_err(|source| BuildError::EventFd {
                    what: "the reset event",
                    source,
                })?;
        pio_bus.insert(
            Arc::new(Mutex::new(I8042::new(EventFdTrigger(reset_trigger)))),
            legacy::I8042_PORT,
            legacy::I8042_PORT_COUNT,
        )?;
        pio_bus.insert(
            Arc::new(Mutex::new(BootTimer::new(
                self.created_at,
                self.boot_timing.clone(),
            ))),
            BOOT_TIMER_PORT,
            1,
        )?;
        Ok(pio_bus)
    }
}

/// The state every vCPU thread shares, with the kick handler installed.
pub(crate) fn vcpu_shared(pio_bus: Bus, mmio_bus: Bus) -> Result<Arc<VcpuShared>, BuildError> {
    crate::vstate::vcpu::install_kick_signal_handler().map_err(BuildError::SignalHandler)?;
    let exit_event = EventFd::new(EFD_NONBLOCK).map_err(|source| BuildError::EventFd {
        what: "the vCPU exit event",
        source,
    })?;
    Ok(Arc::new(VcpuShared {
        pio_bus,
        mmio_bus,
        stop_requested: AtomicBool::new(false),
        pause_requested: AtomicBool::new(false),
        exit_reason: Mutex::new(None),
        exit_event,
        first_entry: OnceLock::new(),
    }))
}

/// The parts of a VM that [`VmBuilder::assemble`] produces.
struct AssembledVm {
    vcpus: Vec<Vcpu>,
    shared: Arc<VcpuShared>,
    legacy: LegacyDevices,
    guest_cmdline: Option<String>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Where and how vCPU 0 starts.
struct BootEntry {
    entry: GuestAddress,
    protocol: BootProtocol,
    boot_info: GuestAddress,
    /// The kernel command line, for Linux boots.
    cmdline: Option<String>,
}

fn load_linux(
    vm: &Vm,
    vcpu_count: u8,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    protocol: BootProtocolChoice,
    devices: &[MmioDeviceSlot],
) -> Result<BootEntry, BuildError> {
    let memory = vm.memory();
    let loaded = loader::load_kernel(memory, kernel, protocol)?;
    let initrd = initrd
        .map(|path| loader::load_initrd(memory, path, loaded.kernel_end))
        .transpose()?;
    let cmdline = loader::assemble_cmdline(cmdline, devices)?;
    let cmdline_size = loader::write_cmdline(memory, &cmdline)?;
    husk_arch::setup_mptable(memory, vcpu_count).map_err(|e| BuildError::BootStructure {
        what: "MP table",
        detail: e.to_string(),
    })?;
    let boot_config = LinuxBootConfig {
        cmdline_addr: GuestAddress(husk_arch::CMDLINE_START),
        cmdline_size,
        initrd,
        setup_header: loaded.setup_header,
    };
    let boot_info =
        match loaded.protocol {
            BootProtocol::Pvh => husk_arch::configure_pvh_start_info(memory, &boot_config)
                .map_err(|e| BuildError::BootStructure {
                    what: "PVH start info",
                    detail: e.to_string(),
                })?,
            BootProtocol::LinuxBoot64 => {
                husk_arch::configure_zero_page(memory, &boot_config).map_err(|e| {
                    BuildError::BootStructure {
                        what: "zero page",
                        detail: e.to_string(),
                    }
                })?;
                GuestAddress(husk_arch::ZERO_PAGE_START)
            }
        };
    tracing::info!(entry = loaded.entry.0, protocol = ?loaded.protocol, %cmdline, "guest kernel loaded");
    Ok(BootEntry {
        entry: loaded.entry,
        protocol: loaded.protocol,
        boot_info,
        cmdline: Some(cmdline),
    })
}

fn create_vcpus(kvm: &Kvm, vm: &Vm, count: u8, boot: &BootEntry) -> Result<Vec<Vcpu>, BuildError> {
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Vcpu {
            index: 0,
            detail: format!("KVM_GET_SUPPORTED_CPUID: {e}"),
        })?;
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let vcpu_error = |detail: String| BuildError::Vcpu { index, detail };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| vcpu_error(format!("KVM_CREATE_VCPU: {e}")))?;
        let mut cpuid = supported_cpuid.clone();
        husk_arch::normalize_cpuid(&mut cpuid, index, count)
            .map_err(|e| vcpu_error(e.to_string()))?;
        husk_arch::set_tsc_deadline_timer(&mut cpuid, tsc_deadline);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| vcpu_error(format!("KVM_SET_CPUID2: {e}")))?;
        husk_arch::setup_lapic_lint(&fd).map_err(|e| vcpu_error(e.to_string()))?;
        if index == 0 {
            husk_arch::setup_boot_vcpu_state(
                &fd,
                vm.memory(),
                boot.protocol,
                boot.entry,
                boot.boot_info,
            )
            .map_err(|e| vcpu_error(e.to_string()))?;
        } else {
            husk_arch::setup_ap_vcpu_state(&fd).map_err(|e| vcpu_error(e.to_string()))?;
        }
        vcpus.push(Vcpu { index, fd });
    }
    Ok(vcpus)
}
