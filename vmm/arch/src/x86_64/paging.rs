//! Identity page tables for entering a 64-bit kernel in long mode.
//!
//! Long mode cannot be entered without paging, so the boot vCPU starts with
//! CR3 at a three-level identity map of the first 1 GiB built from 2 MiB
//! pages: PML4[0] -> PDPT[0] -> 512 PD entries. That covers the kernel (loaded
//! at 1–16 MiB), the zero page, the command line and the initrd of a small
//! guest; the kernel builds its own tables before touching anything higher.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_START, PDPTE_START, PML4_START};
use super::regs::RegsError;

/// Page-table entry bit: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry bit: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-directory entry bit: maps a 2 MiB page instead of a page table.
pub const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Entries per table (4 KiB / 8 bytes).
pub const ENTRIES_PER_TABLE: u64 = 512;
/// Size of a large page mapped by one PD entry.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// Bytes identity-mapped by the boot tables (512 x 2 MiB).
pub const IDENTITY_MAPPED_SIZE: u64 = ENTRIES_PER_TABLE * LARGE_PAGE_SIZE;

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The (guest address, value) pairs of every non-zero boot page-table entry.
pub fn identity_page_table_entries() -> Vec<(u64, u64)> {
    let mut entries = vec![
        (PML4_START, PDPTE_START | PTE_PRESENT | PTE_WRITABLE),
        (PDPTE_START, PDE_START | PTE_PRESENT | PTE_WRITABLE),
    ];
    entries.extend((0..ENTRIES_PER_TABLE).map(|i| {
        (
            PDE_START + i * 8,
            (i * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE,
        )
    }));
    entries
}

/// Writes the identity map and returns the value for CR3. The rest of the
/// PML4 and PDPT pages is zeroed so stale memory cannot add mappings.
pub fn setup_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, RegsError> {
    let write_error = |addr: u64| {
        move |source| RegsError::GuestMemoryWrite {
            what: "boot page tables",
            addr,
            source,
        }
    };
    let zero_page = [0u8; 4096];
    for table in [PML4_START, PDPTE_START] {
        mem.write_slice(&zero_page, GuestAddress(table))
            .map_err(write_error(table))?;
    }
    for (addr, value) in identity_page_table_entries() {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(write_error(addr))?;
    }
    Ok(PML4_START)
}

/// Walks 4-level page tables rooted at `cr3` in guest memory and returns the
/// physical address `vaddr` maps to, or `None` if unmapped. Handles 1 GiB,
/// 2 MiB and 4 KiB pages; used to check the tables we write.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, vaddr: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (vaddr >> shift) & (ENTRIES_PER_TABLE - 1);
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let is_leaf = level == 0 || ((level == 1 || level == 2) && entry & PTE_PAGE_SIZE != 0);
        if is_leaf {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (vaddr & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_gib_is_identity_mapped_and_nothing_beyond() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Pre-fill with garbage to prove the tables are cleaned.
        mem.write_slice(&[0xffu8; 0x3000], GuestAddress(PML4_START))
            .unwrap();
        let cr3 = setup_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for vaddr in [
            0u64,
            0x1000,
            0x12_3456,
            0x100_0000,
            IDENTITY_MAPPED_SIZE - 1,
        ] {
            assert_eq!(translate(&mem, cr3, vaddr), Some(vaddr), "{vaddr:#x}");
        }
        assert_eq!(translate(&mem, cr3, IDENTITY_MAPPED_SIZE), None);
        assert_eq!(translate(&mem, cr3, 1 << 39), None);
    }

    #[test]
    fn directory_entries_are_present_writable_large_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_identity_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 0x3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 0x3);
        let pde5: u64 = mem.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
    }
}
