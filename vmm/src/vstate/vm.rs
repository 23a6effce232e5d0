//! The KVM VM: guest memory registered as memory slots, the in-kernel
//! irqchip (PIC + IOAPIC + LAPICs) and PIT, irqfds and ioeventfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// The three pages KVM needs for the TSS on Intel, placed just below the
/// identity-map page, both at the top of the 3–4 GiB MMIO gap where no
/// device lives.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The one page KVM uses for the real-mode identity map on Intel.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors from setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot set the KVM TSS address {KVM_TSS_ADDRESS:#x}: {0}")]
    TssAddress(#[source] kvm_ioctls::Error),
    #[error("cannot set the KVM identity-map address {KVM_IDENTITY_MAP_ADDRESS:#x}: {0}")]
    IdentityMap(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel irqchip: {0}")]
    IrqChip(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(#[source] kvm_ioctls::Error),
    #[error(
        "cannot register guest memory slot {slot} at {guest_address:#x} ({size} bytes): {source}"
    )]
    MemorySlot {
        slot: u32,
        guest_address: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register an irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot register an ioeventfd at {address:#x} (datamatch {datamatch}): {source}")]
    Ioeventfd {
        address: u64,
        datamatch: u32,
        source: kvm_ioctls::Error,
    },
}

/// One KVM VM with its guest memory.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM with its interrupt controllers and timer. Guest memory
    /// is attached separately by [`Vm::register_memory_slots`], which the
    /// builder runs concurrently with loading the guest: on some hosts (PVM)
    /// adding a memory slot costs milliseconds regardless of its size.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit_config).map_err(VmError::Pit)?;
        Ok(Self { fd, memory })
    }

    /// Registers every region of the guest memory as a KVM memory slot.
    /// Must complete before any vCPU runs.
    pub fn register_memory_slots(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let descriptor = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range belongs to `self.memory`, which this Vm
            // owns and keeps mapped for as long as the VM fd (and so the
            // slot) exists; slots never overlap because the regions don't.
            unsafe { self.fd.set_user_memory_region(descriptor) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    guest_address: descriptor.guest_phys_addr,
                    size: descriptor.memory_size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Routes writes to `eventfd` into GSI `gsi` on the in-kernel irqchip.
    pub fn register_irqfd(&self, eventfd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(eventfd, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Signals `eventfd` inside KVM when the guest writes `datamatch` (32
    /// bits) to the MMIO `address`, without a VM exit to user space.
    pub fn register_mmio_ioeventfd(
        &self,
        eventfd: &EventFd,
        address: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(eventfd, &IoEventAddress::Mmio(address), datamatch)
            .map_err(|source| VmError::Ioeventfd {
                address,
                datamatch,
                source,
            })
    }
}
