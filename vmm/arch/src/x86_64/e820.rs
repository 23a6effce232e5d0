//! The guest's physical memory map, as both boot protocols report it.
//!
//! Built from the mapped guest memory regions: each region is cut at the
//! legacy 640 KiB–1 MiB hole, which is reported as reserved (as a PC BIOS
//! does; it holds the MP table at `EBDA_START`, so the kernel finds the table
//! in memory it maps but never hands out), and at the MMIO gap, which is
//! never reported at all. The same entries feed the zero page's `e820_table`
//! and the PVH memory map.

use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// E820 type of usable RAM (ACPI spec, "Address Range Types").
pub const E820_TYPE_RAM: u32 = 1;
/// E820 type of reserved memory the OS must not use.
pub const E820_TYPE_RESERVED: u32 = 2;

/// What an E820 range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved: present, but not for the OS allocator.
    Reserved,
}

impl E820Kind {
    /// The numeric E820 type (identical for the PVH memory map).
    pub fn e820_type(self) -> u32 {
        match self {
            E820Kind::Ram => E820_TYPE_RAM,
            E820Kind::Reserved => E820_TYPE_RESERVED,
        }
    }
}

/// One range of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address of the range.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// First address after the range.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// Ranges of the physical address space and what guest RAM inside them is.
/// Anything not listed (the MMIO gap) is left out of the map.
const CLASSES: [(u64, u64, E820Kind); 4] = [
    (0, EBDA_START, E820Kind::Ram),
    (EBDA_START, HIMEM_START, E820Kind::Reserved),
    (HIMEM_START, MMIO_GAP_START, E820Kind::Ram),
    (MMIO_GAP_END, u64::MAX, E820Kind::Ram),
];

/// The memory map of `mem`, sorted by address, adjacent ranges of the same
/// kind merged.
pub fn build_e820_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| {
            let start = r.start_addr().raw_value();
            (start, start.saturating_add(r.len()))
        })
        .collect();
    regions.sort_unstable();

    let mut map: Vec<E820Entry> = Vec::new();
    for (start, end) in regions {
        for (class_start, class_end, kind) in CLASSES {
            let lo = start.max(class_start);
            let hi = end.min(class_end);
            if lo >= hi {
                continue;
            }
            match map.last_mut() {
                Some(last) if last.kind == kind && last.end() == lo => last.size += hi - lo,
                _ => map.push(E820Entry {
                    addr: lo,
                    size: hi - lo,
                    kind,
                }),
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::guest_memory_regions;

    const MIB: u64 = 1 << 20;

    fn map_for(size: u64) -> Vec<E820Entry> {
        let mem = GuestMemoryMmap::from_ranges(&guest_memory_regions(size).unwrap()).unwrap();
        build_e820_map(&mem)
    }

    fn assert_gap_unmapped(map: &[E820Entry]) {
        for e in map {
            assert!(
                e.end() <= MMIO_GAP_START || e.addr >= MMIO_GAP_END,
                "{e:?} overlaps the MMIO gap"
            );
        }
    }

    #[test]
    fn map_of_128_mib_has_low_ram_reserved_bios_hole_and_high_ram() {
        let map = map_for(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: EBDA_START,
                    size: HIMEM_START - EBDA_START,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 128 * MIB - HIMEM_START,
                    kind: E820Kind::Ram
                },
            ]
        );
    }

    #[test]
    fn map_of_exactly_3_gib_ends_at_the_gap() {
        let map = map_for(3 * 1024 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].end(), MMIO_GAP_START);
        assert_gap_unmapped(&map);
    }

    #[test]
    fn map_above_4_gib_skips_the_gap() {
        let size = 6 * 1024 * MIB;
        let map = map_for(size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].end(), MMIO_GAP_START);
        assert_eq!(
            map[3],
            E820Entry {
                addr: MMIO_GAP_END,
                size: size - MMIO_GAP_START,
                kind: E820Kind::Ram
            }
        );
        assert_gap_unmapped(&map);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn kinds_map_to_acpi_type_numbers() {
        assert_eq!(E820Kind::Ram.e820_type(), 1);
        assert_eq!(E820Kind::Reserved.e820_type(), 2);
    }
}
