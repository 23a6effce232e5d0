//! Snapshots of a paused microVM, and VMs restored from them: the
//! mechanism behind a pre-booted template.
//!
//! A snapshot is a directory with two files:
//! - `snapshot.json`, the manifest: the format version, the host facts a
//!   restore must match, the RAM layout, KVM's state of the VM and of each
//!   vCPU ([`kvm_state`]), the 8250's registers, and each virtio-mmio
//!   transport's registers and queue positions (`husk_devices::TransportState`);
//! - `memory`, guest RAM, sparse ([`memory`]).
//!
//! It is written into a temporary sibling directory (mode 0700) and
//! renamed into place, so a snapshot directory is either whole or absent.
//!
//! Restoring builds a new VM around that state: the same RAM layout mapped
//! `MAP_PRIVATE` from `memory` (pages shared with every other VM restored
//! from it until written), the VM and vCPU state written back, the
//! console, and the virtio devices the caller gives, which must be of the
//! same types in the same windows: each transport takes its saved
//! registers and, when the device was running, activates the new device
//! with the queues where they stood. The restored VM has not started:
//! `MicroVm::start` (or `run`) continues the guest from where it was paused.
//!
//! What a snapshot does not carry, and so the limits of a template:
//! - the host's CPU and KVM: a snapshot restores only on a host with the
//!   same CPU model and KVM API (checked, and refused naming both);
//! - device backends: a device is restored empty (a vsock device without
//!   connections, a file-system device with a new shared directory): a
//!   stream the guest had open to the host stays open in the guest with
//!   nothing behind it (the shim's templates are taken with one: the
//!   agent's first connection), and only devices that implement
//!   `VirtioDevice::pause` can be in a snapshot;
//! - the guest's notion of wall-clock time and of its own identity: every
//!   VM restored from one template has the same random-number state, the
//!   same MAC addresses and a wall clock behind by the template's age, so
//!   the guest must be told, after restore, to reseed and to set its clock
//!   (the design in `docs/architecture.md`, "Templates"); secrets drawn
//!   before the snapshot (KASLR, running processes' canaries, kernel
//!   hash keys) stay shared;
//! - guest RAM size and vCPU count, which are the template's.

pub mod kvm_state;
pub mod memory;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use husk_devices::{MmioTransport, TransportState, VirtioDevice};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::builder::{place_transport, vcpu_shared, BuildError, LegacyDevices};
use crate::devices::bus::Bus;
use crate::devices::legacy::{self, EventFdTrigger, SerialConsole, SerialRegisters, SerialSink};
use crate::microvm::MicroVm;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use kvm_state::{KvmStateError, VcpuState, VmState};
use memory::{MemoryError, SavedRegion};

/// What the manifest's `format` field says.
pub const SNAPSHOT_FORMAT: &str = "husk-vmm-snapshot";
/// The manifest layout this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;
/// The manifest's file name in a snapshot directory.
pub const MANIFEST_FILE: &str = "snapshot.json";
/// Guest RAM's file name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The largest manifest read back (a vCPU's state is about 40 KiB of JSON).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused before a snapshot is taken")]
    NotPaused,
    #[error("no snapshot directory at {path}")]
    Missing { path: PathBuf },
    #[error("{path} already exists: a snapshot never overwrites anything")]
    Exists { path: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the snapshot manifest {path} is invalid: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error("the snapshot at {path} is {found}; this build reads {SNAPSHOT_FORMAT} version {SNAPSHOT_VERSION}")]
    Version { path: PathBuf, found: String },
    #[error(
        "the snapshot was taken on a host whose {what} is {snapshot:?}; this host's is {host:?}"
    )]
    HostMismatch {
        what: &'static str,
        snapshot: String,
        host: String,
    },
    #[error("the snapshot has {snapshot} virtio devices; {given} were given to restore it")]
    DeviceCount { snapshot: usize, given: usize },
    #[error("the snapshot holds virtio devices of types {snapshot:?}; the VM has {given:?}")]
    DeviceTypes { snapshot: Vec<u32>, given: Vec<u32> },
    #[error("the snapshot has {0} vCPUs; between 1 and 254 are supported")]
    VcpuCount(usize),
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot save virtio device {index}: {source}")]
    Device {
        index: usize,
        source: husk_devices::PauseError,
    },
    #[error("cannot restore the console: {0}")]
    Console(String),
}

/// Facts about the host a snapshot was taken on that a restore must match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// `/proc/cpuinfo`'s first `model name`.
    pub cpu_model: String,
    /// `KVM_GET_API_VERSION`.
    pub kvm_api_version: i32,
}

impl HostFacts {
    fn of(kvm: &Kvm) -> Self {
        Self {
            cpu_model: host_cpu_model(),
            kvm_api_version: kvm.get_api_version(),
        }
    }
}

fn host_cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The manifest: everything but guest RAM.
#[derive(Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub host: HostFacts,
    pub memory: Vec<SavedRegion>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialRegisters,
    pub devices: Vec<TransportState>,
    pub guest_cmdline: Option<String>,
}

/// What a saved snapshot holds, for the caller's log.
#[derive(Clone, Debug)]
pub struct SnapshotSummary {
    pub directory: PathBuf,
    pub vcpus: usize,
    pub devices: usize,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Guest RAM that was not all zeros and so was written, bytes.
    pub memory_written_bytes: u64,
}

/// A paused VM's parts that [`save`] reads.
pub(crate) struct SnapshotSource<'a> {
    pub vm: &'a Vm,
    pub vcpus: &'a [Vcpu],
    pub msr_indices: &'a [u32],
    pub serial: &'a Arc<Mutex<SerialConsole>>,
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    pub guest_cmdline: Option<&'a str>,
    pub directory: &'a Path,
}

/// The MSRs a snapshot saves: KVM's whole index list (those a vCPU cannot
/// read are skipped when it is saved). Empty if KVM will not say.
pub(crate) fn msr_indices(kvm: &Kvm) -> Vec<u32> {
    match kvm.get_msr_index_list() {
        Ok(list) => list.as_slice().to_vec(),
        Err(error) => {
            tracing::warn!(%error, "KVM_GET_MSR_INDEX_LIST failed: snapshots will hold no MSRs");
            Vec::new()
        }
    }
}

/// Writes a paused VM's snapshot into `source.directory`.
pub(crate) fn save(source: SnapshotSource<'_>) -> Result<SnapshotSummary, SnapshotError> {
    let directory = source.directory;
    if directory.exists() {
        return Err(SnapshotError::Exists {
            path: directory.to_owned(),
        });
    }
    let vm = VmState::capture(source.vm.fd())?;
    let vcpus = source
        .vcpus
        .iter()
        .map(|vcpu| VcpuState::capture(&vcpu.fd, vcpu.index, source.msr_indices))
        .collect::<Result<Vec<_>, _>>()?;
    let devices = source
        .transports
        .iter()
        .enumerate()
        .map(|(index, transport)| {
            transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state()
                .map_err(|source| SnapshotError::Device { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let serial = source
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .registers();
    let staging = staging_directory(directory);
    create_private_directory(&staging)?;
    let written = write_contents(&source, &staging, vm, vcpus, serial, devices);
    let summary = match written {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
    };
    if let Err(source) = std::fs::rename(&staging, directory) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(SnapshotError::Io {
            what: "move the finished snapshot to",
            path: directory.to_owned(),
            source,
        });
    }
    Ok(SnapshotSummary {
        directory: directory.to_owned(),
        ..summary
    })
}

fn write_contents(
    source: &SnapshotSource<'_>,
    staging: &Path,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: SerialRegisters,
    devices: Vec<TransportState>,
) -> Result<SnapshotSummary, SnapshotError> {
    let kvm_facts = Kvm::new()
        .map(|kvm| HostFacts::of(&kvm))
        .unwrap_or(HostFacts {
            cpu_model: host_cpu_model(),
            kvm_api_version: 12,
        });
    let (layout, memory_written_bytes) =
        memory::save(source.vm.memory(), &staging.join(MEMORY_FILE))?;
    let memory_bytes = layout.iter().map(|r| r.size).sum();
    let manifest = Manifest {
        format: SNAPSHOT_FORMAT.to_owned(),
        version: SNAPSHOT_VERSION,
        host: kvm_facts,
        memory: layout,
        vm,
        vcpus,
        serial,
        devices,
        guest_cmdline: source.guest_cmdline.map(str::to_owned),
    };
    let manifest_path = staging.join(MANIFEST_FILE);
    let json = serde_json::to_vec(&manifest).map_err(|error| SnapshotError::Manifest {
        path: manifest_path.clone(),
        detail: error.to_string(),
    })?;
    write_private_file(&manifest_path, &json)?;
    Ok(SnapshotSummary {
        directory: staging.to_owned(),
        vcpus: manifest.vcpus.len(),
        devices: manifest.devices.len(),
        memory_bytes,
        memory_written_bytes,
    })
}

/// `<directory>.partial-<pid>`, beside it so the final rename stays on
/// one file system.
fn staging_directory(directory: &Path) -> PathBuf {
    let mut name = directory
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "snapshot".into());
    name.push(format!(".partial-{}", std::process::id()));
    directory.with_file_name(name)
}

fn create_private_directory(path: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|source| SnapshotError::Io {
            what: "create the snapshot directory",
            path: path.to_owned(),
            source,
        })
}

fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |source| SnapshotError::Io {
        what: "write",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    file.write_all(contents).map_err(io_error)
}

/// Reads a snapshot's manifest and checks its format and version (not the
/// host: see [`read_manifest`]).
pub fn load_manifest(directory: &Path) -> Result<Manifest, SnapshotError> {
    use std::io::Read;
    let path = directory.join(MANIFEST_FILE);
    let file = std::fs::File::open(&path).map_err(|source| SnapshotError::Io {
        what: "open",
        path: path.clone(),
        source,
    })?;
    let mut json = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut json)
        .map_err(|source| SnapshotError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
    if json.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(SnapshotError::Manifest {
            path,
            detail: format!("it is larger than {MAX_MANIFEST_BYTES} bytes"),
        });
    }
    // The format and version first, so an older or foreign file is named
    // as such rather than as malformed.
    #[derive(Deserialize)]
    struct Header {
        format: String,
        version: u32,
    }
    let header: Header =
        serde_json::from_slice(&json).map_err(|error| SnapshotError::Manifest {
            path: path.clone(),
            detail: error.to_string(),
        })?;
    if header.format != SNAPSHOT_FORMAT || header.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: format!("{} version {}", header.format, header.version),
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|error| SnapshotError::Manifest {
            path: path.clone(),
            detail: error.to_string(),
        })?;
    if manifest.vcpus.is_empty() || manifest.vcpus.len() > husk_arch::MAX_SUPPORTED_CPUS as usize {
        return Err(SnapshotError::VcpuCount(manifest.vcpus.len()));
    }
    Ok(manifest)
}

/// Reads and checks a snapshot's manifest: its format and version, and
/// that this host is the kind it was taken on.
pub fn read_manifest(directory: &Path, kvm: &Kvm) -> Result<Manifest, SnapshotError> {
    let manifest = load_manifest(directory)?;
    let host = HostFacts::of(kvm);
    if manifest.host.cpu_model != host.cpu_model {
        return Err(SnapshotError::HostMismatch {
            what: "CPU model",
            snapshot: manifest.host.cpu_model,
            host: host.cpu_model,
        });
    }
    if manifest.host.kvm_api_version != host.kvm_api_version {
        return Err(SnapshotError::HostMismatch {
            what: "KVM API version",
            snapshot: manifest.host.kvm_api_version.to_string(),
            host: host.kvm_api_version.to_string(),
        });
    }
    Ok(manifest)
}

/// What a snapshot holds, for an operator's listing.
#[derive(Clone, Debug)]
pub struct SnapshotDescription {
    pub vcpus: usize,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// What the memory file holds on disk (its holes excluded), bytes.
    pub memory_allocated_bytes: u64,
    pub device_types: Vec<u32>,
    pub cpu_model: String,
}

/// Describes the snapshot in `directory` without restoring it.
pub fn describe(directory: &Path) -> Result<SnapshotDescription, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let manifest = load_manifest(directory)?;
    let memory = directory.join(MEMORY_FILE);
    let allocated = std::fs::metadata(&memory)
        .map_err(|source| SnapshotError::Io {
            what: "stat",
            path: memory,
            source,
        })?
        .blocks()
        * 512;
    Ok(SnapshotDescription {
        vcpus: manifest.vcpus.len(),
        memory_bytes: manifest.memory.iter().map(|r| r.size).sum(),
        memory_allocated_bytes: allocated,
        device_types: manifest.devices.iter().map(|d| d.device_type).collect(),
        cpu_model: manifest.host.cpu_model,
    })
}

/// Whether the snapshot in `directory` can be restored on this host with
/// virtio devices of `device_types`, in that order: its manifest is whole,
/// of this format, taken on this kind of host, with the same devices. A
/// caller checks this before it hands its devices to a restore, which
/// consumes them.
pub fn check_restorable(directory: &Path, device_types: &[u32]) -> Result<(), SnapshotError> {
    let kvm = Kvm::new().map_err(|error| SnapshotError::Io {
        what: "open KVM to check the snapshot in",
        path: directory.to_owned(),
        source: std::io::Error::from_raw_os_error(error.errno()),
    })?;
    let manifest = read_manifest(directory, &kvm)?;
    let saved: Vec<u32> = manifest.devices.iter().map(|d| d.device_type).collect();
    if saved.len() != device_types.len() {
        return Err(SnapshotError::DeviceCount {
            snapshot: saved.len(),
            given: device_types.len(),
        });
    }
    if saved != device_types {
        return Err(SnapshotError::DeviceTypes {
            snapshot: saved,
            given: device_types.to_vec(),
        });
    }
    Ok(())
}

/// Builds a VM from the snapshot in `directory` with `devices` in its
/// virtio windows and the console writing to `serial`. Nothing runs until
/// `MicroVm::start`.
pub(crate) fn restore(
    kvm: &Kvm,
    directory: &Path,
    devices: Vec<Box<dyn VirtioDevice>>,
    serial: SerialSink,
    created_at: Instant,
) -> Result<MicroVm, BuildError> {
    let manifest = read_manifest(directory, kvm)?;
    if devices.len() != manifest.devices.len() {
        return Err(SnapshotError::DeviceCount {
            snapshot: manifest.devices.len(),
            given: devices.len(),
        }
        .into());
    }
    let memory = memory::map_private(&directory.join(MEMORY_FILE), &manifest.memory)
        .map_err(SnapshotError::from)?;
    let vm = Vm::new(kvm, memory)?;
    vm.register_memory_slots()?;

    // The machine's state first: vCPUs, then the interrupt controllers
    // (whose local APICs exist only once the vCPUs do). Only then may a
    // device run: an interrupt a device raised into a controller that
    // KVM_SET_IRQCHIP then overwrote would be lost.
    let mut vcpus = Vec::with_capacity(manifest.vcpus.len());
    for (index, state) in manifest.vcpus.iter().enumerate() {
        let index = index as u8; // load_manifest bounds the count
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| BuildError::Vcpu {
                index,
                detail: format!("KVM_CREATE_VCPU: {e}"),
            })?;
        state.apply(&fd, index).map_err(SnapshotError::from)?;
        vcpus.push(Vcpu { index, fd });
    }
    manifest.vm.apply(vm.fd()).map_err(SnapshotError::from)?;

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|source| BuildError::EventFd {
        what: "the serial interrupt",
        source,
    })?;
    vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)?;
    let serial_reraise = serial_irq
        .try_clone()
        .map_err(|source| BuildError::EventFd {
            what: "the serial interrupt",
            source,
        })?;
    let console =
        SerialConsole::from_registers(&manifest.serial, EventFdTrigger(serial_irq), serial)
            .map_err(SnapshotError::Console)?;
    let legacy = LegacyDevices::new(console, created_at)?;

    let mut mmio_bus = Bus::new();
    let mut transports = Vec::with_capacity(devices.len());
    for (index, (device, state)) in devices.into_iter().zip(&manifest.devices).enumerate() {
        let (transport, _) = place_transport(&vm, &mut mmio_bus, index, |memory, irqfd| {
            MmioTransport::restore(device, memory, irqfd, state)
        })?;
        transports.push(transport);
    }

    // Interrupts pending when the snapshot was taken: an irqfd write KVM
    // had not yet delivered into the saved controllers is not in them, so
    // every source with something pending raises its line once more (a
    // spurious one is answered "not mine" by the driver).
    for transport in &transports {
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reassert_interrupt();
    }
    // IIR bit 0 clear: the 8250 has an interrupt pending.
    if manifest.serial.interrupt_identification & 1 == 0 {
        if let Err(error) = serial_reraise.write(1) {
            tracing::warn!(%error, "cannot raise the restored console's pending interrupt");
        }
    }
    let shared = vcpu_shared(legacy.pio_bus()?, mmio_bus)?;
    tracing::info!(
        snapshot = %directory.display(),
        vcpus = vcpus.len(),
        devices = transports.len(),
        elapsed_us = created_at.elapsed().as_micros() as u64,
        "VM restored from a snapshot"
    );
    Ok(MicroVm::new(
        vm,
        vcpus,
        shared,
        legacy,
        created_at,
        manifest.guest_cmdline,
        transports,
        crate::snapshot::msr_indices(kvm),
    ))
}
