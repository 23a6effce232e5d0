//! The guest physical memory layout of a husk microVM.
//!
//! Every fixed address the boot code writes to is a named constant here, so
//! the structures written by the other modules cannot overlap by accident
//! (the `const` assertions at the bottom check the ordering at compile time).
//! Low memory (below 1 MiB) holds the boot structures the way a PC BIOS
//! would leave them; RAM is split around a 1 GiB MMIO gap just below 4 GiB
//! in which the virtio-mmio windows, the IOAPIC and the local APICs live.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_9000  PML4
//! 0x0000_0520  boot IDT            0x0000_a000  PDPT
//! 0x0000_6000  PVH start info      0x0000_b000  PD (2 MiB pages, first 1 GiB)
//! 0x0000_7000  zero page           0x0002_0000  kernel command line
//! 0x0000_8ff0  boot stack top      0x0009_fc00  EBDA: MP table (reserved to 1 MiB)
//! 0x0010_0000  kernel and RAM ...  0xc000_0000  MMIO gap to 4 GiB, RAM again above
//! ```

use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Size of a guest page; memory sizes and the initrd address are aligned to it.
pub const PAGE_SIZE: u64 = 0x1000;

/// Where the boot GDT is written (4 descriptors, see `gdt`). Above the real-mode
/// IVT (0x0–0x3ff) and the BIOS data area (0x400–0x4ff) a kernel may still read.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT is written, right after the 4-entry GDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// `hvm_start_info` for PVH boot; its module list and memory map follow it
/// inside the same page.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (one entry: the initrd), after the 56-byte start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map, after the module list; it runs up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry: below the page tables,
/// 16-byte aligned as the SysV ABI expects at a call boundary.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity mapping (512 x 2 MiB = 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass, including the NUL: x86's `COMMAND_LINE_SIZE`
/// (arch/x86/include/asm/setup.h), the buffer the kernel copies it into.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: 639 KiB, the "last KiB of base
/// memory" Linux scans for the MP floating pointer (`smp_scan_config`).
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy 640 KiB–1 MiB hole; the kernel is loaded here or
/// higher, and RAM is reported to the guest again from here.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the MMIO gap below 4 GiB (no RAM is mapped in [start, end)).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the MMIO gap: RAM beyond `MMIO_GAP_START` continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the MMIO gap (1 GiB).
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// First virtio-mmio window inside the gap; further devices follow every
/// `VIRTIO_MMIO_WINDOW_SIZE` bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Size of one virtio-mmio register window (the virtio-mmio layout needs 0x200).
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;
/// IOAPIC MMIO base: the architectural default KVM's in-kernel IOAPIC uses.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Local APIC MMIO base: the architectural default (IA32_APIC_BASE reset value).
pub const APIC_ADDR: u64 = 0xFEE0_0000;

/// First GSI handed to devices: 0–4 belong to the PIT, keyboard, cascade and
/// the two legacy serial ports.
pub const IRQ_BASE: u32 = 5;
/// Last GSI handed to devices: KVM's in-kernel IOAPIC has 24 pins (0–23).
pub const IRQ_MAX: u32 = 23;
/// Number of IOAPIC pins, all announced in the MP table.
pub const IOAPIC_NUM_PINS: u32 = IRQ_MAX + 1;

/// Smallest guest memory we accept: the boot structures below 1 MiB, a
/// vmlinux loaded at the 16 MiB `CONFIG_PHYSICAL_START` default with its
/// BSS, and room for the page allocator to come up. This floor only rejects
/// sizes no kernel can boot in; whether a given kernel plus initrd fits is
/// checked when placing the initrd (`initrd_load_address_above`).
pub const MIN_GUEST_MEMORY_MIB: u64 = 32;
/// Largest guest memory we accept, so that a unit mistake (bytes passed as
/// MiB) fails loudly: 256 GiB, plus the 1 GiB that moves above 4 GiB, stays
/// below 2^39 bytes, the smallest MAXPHYADDR of x86-64 CPUs KVM runs on.
pub const MAX_GUEST_MEMORY_MIB: u64 = 256 * 1024;

const MIB: u64 = 1 << 20;

/// Errors from laying out guest memory.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Guest memory size is zero.
    #[error("guest memory size is 0 bytes")]
    ZeroMemory,
    /// Guest memory below the supported minimum.
    #[error("guest memory of {size} bytes is below the minimum of {MIN_GUEST_MEMORY_MIB} MiB")]
    MemoryTooSmall {
        /// Requested size in bytes.
        size: u64,
    },
    /// Guest memory above the supported maximum.
    #[error("guest memory of {size} bytes is above the maximum of {MAX_GUEST_MEMORY_MIB} MiB")]
    MemoryTooLarge {
        /// Requested size in bytes.
        size: u64,
    },
    /// Guest memory size is not a whole number of pages.
    #[error("guest memory of {size} bytes is not a multiple of the {PAGE_SIZE}-byte page size")]
    MemoryNotPageAligned {
        /// Requested size in bytes.
        size: u64,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd of {initrd_size} bytes does not fit in guest memory of {mem_size} bytes \
         (room is [{floor:#x}, {ceiling:#x}))"
    )]
    InitrdDoesNotFit {
        /// Size of the initrd in bytes.
        initrd_size: usize,
        /// Total guest memory in bytes.
        mem_size: u64,
        /// Lowest address the initrd may start at (end of the kernel).
        floor: u64,
        /// First address above low memory (end of RAM or the MMIO gap).
        ceiling: u64,
    },
}

/// Splits `mem_size_bytes` of guest RAM into the regions to map: one region
/// from 0 if it ends at or below the MMIO gap, otherwise the part below the gap
/// plus the rest starting at 4 GiB. Nothing is ever mapped inside the gap.
pub fn guest_memory_regions(
    mem_size_bytes: u64,
) -> Result<Vec<(GuestAddress, usize)>, LayoutError> {
    if mem_size_bytes == 0 {
        return Err(LayoutError::ZeroMemory);
    }
    if mem_size_bytes < MIN_GUEST_MEMORY_MIB * MIB {
        return Err(LayoutError::MemoryTooSmall {
            size: mem_size_bytes,
        });
    }
    if mem_size_bytes > MAX_GUEST_MEMORY_MIB * MIB {
        return Err(LayoutError::MemoryTooLarge {
            size: mem_size_bytes,
        });
    }
    // PAGE_SIZE is a power of two (bit test, not `is_multiple_of`: MSRV 1.85).
    if mem_size_bytes & (PAGE_SIZE - 1) != 0 {
        return Err(LayoutError::MemoryNotPageAligned {
            size: mem_size_bytes,
        });
    }
    // The maximum (256 GiB) fits in usize on the 64-bit hosts this crate builds for.
    let to_usize = |n: u64| usize::try_from(n).map_err(|_| LayoutError::MemoryTooLarge { size: n });
    if mem_size_bytes <= MMIO_GAP_START {
        return Ok(vec![(GuestAddress(0), to_usize(mem_size_bytes)?)]);
    }
    Ok(vec![
        (GuestAddress(0), to_usize(MMIO_GAP_START)?),
        (
            GuestAddress(MMIO_GAP_END),
            to_usize(mem_size_bytes - MMIO_GAP_START)?,
        ),
    ])
}

/// Total bytes of guest RAM across all regions.
pub fn guest_memory_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// End (exclusive) of RAM below the MMIO gap: where low memory stops.
pub fn low_memory_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| {
            r.start_addr()
                .raw_value()
                .saturating_add(r.len())
                .min(MMIO_GAP_START)
        })
        .max()
        .unwrap_or(0)
}

/// Where to load an initrd of `initrd_size` bytes: as high as possible in low
/// memory (below the MMIO gap, so 32-bit `ramdisk_image` fields can hold it),
/// page aligned, and not below `HIMEM_START`. The caller that knows where the
/// kernel ends should use [`initrd_load_address_above`] instead.
pub fn initrd_load_address(
    mem: &GuestMemoryMmap,
    initrd_size: usize,
) -> Result<GuestAddress, LayoutError> {
    initrd_load_address_above(mem, initrd_size, GuestAddress(HIMEM_START))
}

/// Like [`initrd_load_address`], but the initrd must start at or above
/// `kernel_end` (the first byte after the loaded kernel image).
pub fn initrd_load_address_above(
    mem: &GuestMemoryMmap,
    initrd_size: usize,
    kernel_end: GuestAddress,
) -> Result<GuestAddress, LayoutError> {
    let ceiling = low_memory_end(mem);
    let floor = kernel_end.raw_value().max(HIMEM_START);
    let does_not_fit = || LayoutError::InitrdDoesNotFit {
        initrd_size,
        mem_size: guest_memory_size(mem),
        floor,
        ceiling,
    };
    let size = u64::try_from(initrd_size).map_err(|_| does_not_fit())?;
    let start = ceiling.checked_sub(size).ok_or_else(does_not_fit)? & !(PAGE_SIZE - 1);
    if start < floor {
        return Err(does_not_fit());
    }
    Ok(GuestAddress(start))
}

// The fixed boot structures must not overlap one another.
const _: () = assert!(BOOT_GDT_START + 4 * 8 <= BOOT_IDT_START);
const _: () = assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
const _: () = assert!(PVH_INFO_START + 56 <= PVH_MODLIST_START);
const _: () = assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
const _: () = assert!(PVH_MEMMAP_START < ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PDE_START + 4096 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(EBDA_START < HIMEM_START);
const _: () = assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && VIRTIO_MMIO_BASE < IOAPIC_ADDR);
const _: () = assert!(IOAPIC_ADDR < APIC_ADDR && APIC_ADDR < MMIO_GAP_END);

#[cfg(test)]
mod tests {
    use super::*;

    fn mem_of(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&guest_memory_regions(size).expect("layout")).expect("mmap")
    }

    #[test]
    fn small_memory_is_one_region_from_zero() {
        let regions = guest_memory_regions(128 * MIB).unwrap();
        assert_eq!(regions, vec![(GuestAddress(0), (128 * MIB) as usize)]);
    }

    #[test]
    fn memory_ending_exactly_at_the_gap_is_one_region() {
        let regions = guest_memory_regions(MMIO_GAP_START).unwrap();
        assert_eq!(regions, vec![(GuestAddress(0), MMIO_GAP_START as usize)]);
    }

    #[test]
    fn memory_beyond_the_gap_is_split_around_it() {
        let size = 4 * 1024 * MIB + 512 * MIB;
        let regions = guest_memory_regions(size).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
            ]
        );
        let total: u64 = regions.iter().map(|(_, len)| *len as u64).sum();
        assert_eq!(total, size);
        for (start, len) in regions {
            let end = start.raw_value() + len as u64;
            assert!(end <= MMIO_GAP_START || start.raw_value() >= MMIO_GAP_END);
        }
    }

    #[test]
    fn zero_tiny_huge_and_unaligned_sizes_are_rejected() {
        assert_eq!(guest_memory_regions(0), Err(LayoutError::ZeroMemory));
        assert_eq!(
            guest_memory_regions(16 * MIB),
            Err(LayoutError::MemoryTooSmall { size: 16 * MIB })
        );
        let huge = (MAX_GUEST_MEMORY_MIB + 1) * MIB;
        assert_eq!(
            guest_memory_regions(huge),
            Err(LayoutError::MemoryTooLarge { size: huge })
        );
        let odd = 64 * MIB + 1;
        assert_eq!(
            guest_memory_regions(odd),
            Err(LayoutError::MemoryNotPageAligned { size: odd })
        );
        assert!(LayoutError::MemoryTooSmall { size: 16 * MIB }
            .to_string()
            .contains("16777216 bytes"));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_page_aligned() {
        let mem = mem_of(128 * MIB);
        let addr = initrd_load_address(&mem, 10_000).unwrap();
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + 10_000 <= 128 * MIB);
        assert!(addr.raw_value() + 10_000 + PAGE_SIZE > 128 * MIB);
    }

    #[test]
    fn initrd_stays_below_the_gap_when_memory_is_split() {
        let mem = mem_of(5 * 1024 * MIB);
        let addr = initrd_load_address(&mem, 4 * MIB as usize).unwrap();
        assert_eq!(addr.raw_value(), MMIO_GAP_START - 4 * MIB);
    }

    #[test]
    fn initrd_larger_than_memory_is_rejected_with_sizes() {
        let mem = mem_of(32 * MIB);
        let err = initrd_load_address(&mem, 64 * MIB as usize).unwrap_err();
        assert!(err.to_string().starts_with(
            "initrd of 67108864 bytes does not fit in guest memory of 33554432 bytes"
        ));
        let err =
            initrd_load_address_above(&mem, 8 * MIB as usize, GuestAddress(30 * MIB)).unwrap_err();
        assert!(matches!(err, LayoutError::InitrdDoesNotFit { floor, .. } if floor == 30 * MIB));
    }
}
