//! PVH boot information (`struct hvm_start_info`, Xen's `arch-x86/hvm/start_info.h`).
//!
//! A kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note is entered in 32-bit
//! protected mode with EBX pointing at the start info. Built here: the start
//! info (magic, version 1 so the memory-map fields are valid, command line)
//! at `PVH_INFO_START`, a one-entry module list for the initrd right after
//! it, and the memory map (the E820 ranges) after that, all inside one page.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{validate_boot_config, BootError, LinuxBootConfig};
use super::e820::build_e820_map;
use super::layout::{PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START};

/// `hvm_start_info.magic` (`XEN_HVM_START_MAGIC_VALUE`).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Start info version 1: adds `memmap_paddr` and `memmap_entries`.
pub const PVH_START_INFO_VERSION: u32 = 1;
/// Memory map entries that fit between `PVH_MEMMAP_START` and the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize =
    ((ZERO_PAGE_START - PVH_MEMMAP_START) as usize) / std::mem::size_of::<hvm_memmap_table_entry>();

/// The start info, module list and memory map for `cfg`, unwritten.
pub fn build_pvh_start_info(
    mem: &GuestMemoryMmap,
    cfg: &LinuxBootConfig,
) -> Result<
    (
        hvm_start_info,
        Vec<hvm_modlist_entry>,
        Vec<hvm_memmap_table_entry>,
    ),
    BootError,
> {
    validate_boot_config(mem, cfg)?;

    let memmap: Vec<hvm_memmap_table_entry> = build_e820_map(mem)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.e820_type(),
            reserved: 0,
        })
        .collect();
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryMapEntries {
            count: memmap.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
            what: "PVH memory map",
        });
    }
    let modules: Vec<hvm_modlist_entry> = cfg
        .initrd
        .iter()
        .map(|(addr, size)| hvm_modlist_entry {
            paddr: addr.raw_value(),
            size: *size as u64,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();

    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: cfg.cmdline_addr.raw_value(),
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_START,
        // Bounded by PVH_MEMMAP_MAX_ENTRIES (165) just above.
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok((info, modules, memmap))
}

/// Writes the PVH start info, module list and memory map for `cfg` and
/// returns the start info's address (for EBX at the PVH entry).
pub fn configure_pvh_start_info(
    mem: &GuestMemoryMmap,
    cfg: &LinuxBootConfig,
) -> Result<GuestAddress, BootError> {
    let (info, modules, memmap) = build_pvh_start_info(mem, cfg)?;
    write_array(mem, PVH_MODLIST_START, &modules, "PVH module list")?;
    write_array(mem, PVH_MEMMAP_START, &memmap, "PVH memory map")?;
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|source| BootError::GuestMemoryWrite {
            what: "PVH start info",
            addr: PVH_INFO_START,
            source,
        })?;
    Ok(GuestAddress(PVH_INFO_START))
}

fn write_array<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    start: u64,
    items: &[T],
    what: &'static str,
) -> Result<(), BootError> {
    let mut addr = GuestAddress(start);
    for item in items {
        mem.write_obj(*item, addr)
            .map_err(|source| BootError::GuestMemoryWrite {
                what,
                addr: addr.raw_value(),
                source,
            })?;
        addr = addr.unchecked_add(std::mem::size_of::<T>() as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::e820::{E820_TYPE_RAM, E820_TYPE_RESERVED};
    use crate::x86_64::layout::{guest_memory_regions, CMDLINE_START, EBDA_START, MMIO_GAP_END};

    const MIB: u64 = 1 << 20;

    #[test]
    fn start_info_read_back_has_magic_memmap_and_initrd_module() {
        let size = 5 * 1024 * MIB;
        let mem = GuestMemoryMmap::from_ranges(&guest_memory_regions(size).unwrap()).unwrap();
        let cfg = LinuxBootConfig {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 10,
            initrd: Some((GuestAddress(64 * MIB), 12345)),
            setup_header: None,
        };
        let addr = configure_pvh_start_info(&mem, &cfg).unwrap();
        assert_eq!(addr, GuestAddress(PVH_INFO_START));

        let info: hvm_start_info = mem.read_obj(addr).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 4);

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (64 * MIB, 12345));

        let entry = |i: u64| -> hvm_memmap_table_entry {
            mem.read_obj(GuestAddress(info.memmap_paddr + i * 24))
                .unwrap()
        };
        assert_eq!((entry(0).addr, entry(0).type_), (0, E820_TYPE_RAM));
        assert_eq!(
            (entry(1).addr, entry(1).type_),
            (EBDA_START, E820_TYPE_RESERVED)
        );
        assert_eq!(
            (entry(3).addr, entry(3).size, entry(3).type_),
            (MMIO_GAP_END, 2 * 1024 * MIB, E820_TYPE_RAM)
        );
    }

    #[test]
    fn start_info_without_initrd_has_no_modules() {
        let mem = GuestMemoryMmap::from_ranges(&guest_memory_regions(64 * MIB).unwrap()).unwrap();
        let cfg = LinuxBootConfig {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 1,
            initrd: None,
            setup_header: None,
        };
        let (info, modules, memmap) = build_pvh_start_info(&mem, &cfg).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(modules.is_empty());
        assert_eq!(memmap.len(), 3);
    }

    #[test]
    fn memmap_capacity_matches_the_space_before_the_zero_page() {
        assert_eq!(std::mem::size_of::<hvm_start_info>(), 56);
        assert_eq!(PVH_MEMMAP_MAX_ENTRIES, 165);
    }
}
