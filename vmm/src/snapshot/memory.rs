//! Guest RAM in a snapshot: written once to a sparse file, mapped privately
//! by every VM restored from it.
//!
//! Saving writes each RAM region at its offset in one file and skips the
//! pages that are all zeros, so the file holds only what the guest
//! touched. Restoring maps each region `MAP_PRIVATE` from that file: a page
//! is read from the page cache on first access and copied only when that
//! VM writes it, so every VM restored from one template shares the pages
//! none of them changed (the kernel, the agent, the page cache the guest
//! built while it booted). The balloon's free page reporting already knows
//! this backing: `MADV_DONTNEED` on a private file mapping drops the VM's
//! copy and the guest next reads the template's page
//! (`husk_devices::balloon`'s discard table).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

/// The page size zero pages are detected at.
const PAGE: usize = 4096;
/// How much guest memory is copied out at a time.
const CHUNK: usize = 1 << 20;

/// One RAM region and where its bytes are in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRegion {
    pub guest_address: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// What went wrong with a snapshot's memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the memory file {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write guest RAM at {guest_address:#x} to {path}: {source}")]
    Write {
        path: String,
        guest_address: u64,
        source: std::io::Error,
    },
    #[error("cannot size the memory file {path} to {length} bytes: {source}")]
    SetLength {
        path: String,
        length: u64,
        source: std::io::Error,
    },
    #[error("cannot read guest RAM at {guest_address:#x}: {detail}")]
    Read { guest_address: u64, detail: String },
    #[error("cannot open the memory file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("the memory file {path} holds {actual} bytes, the snapshot's regions need {expected}")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("the snapshot's RAM regions are invalid: {0}")]
    Layout(String),
    #[error("cannot map the memory file {path} at guest address {guest_address:#x}: {detail}")]
    Map {
        path: String,
        guest_address: u64,
        detail: String,
    },
}

/// Writes every RAM region of `memory` to a new file at `path` (mode
/// 0600), leaving all-zero pages as holes. Returns the regions' layout in
/// the file and how many bytes were written.
pub fn save(memory: &GuestMemoryMmap, path: &Path) -> Result<(Vec<SavedRegion>, u64), MemoryError> {
    let shown = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| MemoryError::Create {
            path: shown.clone(),
            source,
        })?;
    let mut layout = Vec::new();
    let mut file_offset = 0u64;
    let mut written = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    for region in memory.iter() {
        let guest_address = region.start_addr().0;
        let size = region.len();
        let mut done = 0u64;
        while done < size {
            let length = (size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buffer[..length];
            region
                .get_slice(MemoryRegionAddress(done), length)
                .map_err(|error| MemoryError::Read {
                    guest_address: guest_address + done,
                    detail: error.to_string(),
                })?
                .copy_to(chunk);
            for (page_index, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().all(|&byte| byte == 0) {
                    continue;
                }
                let at = done + (page_index * PAGE) as u64;
                file.write_all_at(page, file_offset + at)
                    .map_err(|source| MemoryError::Write {
                        path: shown.clone(),
                        guest_address: guest_address + at,
                        source,
                    })?;
                written += page.len() as u64;
            }
            done += length as u64;
        }
        layout.push(SavedRegion {
            guest_address,
            size,
            file_offset,
        });
        file_offset += size;
    }
    // The holes at the end are part of the file too.
    file.set_len(file_offset)
        .map_err(|source| MemoryError::SetLength {
            path: shown,
            length: file_offset,
            source,
        })?;
    Ok((layout, written))
}

/// Maps the memory file at `path` privately, one mapping per region of
/// `layout`, after checking the layout against the file.
pub fn map_private(path: &Path, layout: &[SavedRegion]) -> Result<GuestMemoryMmap, MemoryError> {
    let shown = path.display().to_string();
    check_layout(layout)?;
    let file = File::open(path).map_err(|source| MemoryError::Open {
        path: shown.clone(),
        source,
    })?;
    let expected = layout.iter().map(|r| r.size).sum::<u64>();
    let actual = file
        .metadata()
        .map_err(|source| MemoryError::Open {
            path: shown.clone(),
            source,
        })?
        .len();
    if actual != expected {
        return Err(MemoryError::Size {
            path: shown,
            expected,
            actual,
        });
    }
    let mut regions = Vec::with_capacity(layout.len());
    for saved in layout {
        let map_error = |detail: String| MemoryError::Map {
            path: shown.clone(),
            guest_address: saved.guest_address,
            detail,
        };
        let file = file
            .try_clone()
            .map_err(|error| map_error(error.to_string()))?;
        let mapping = vm_memory::mmap::MmapRegionBuilder::new(saved.size as usize)
            .with_file_offset(FileOffset::new(file, saved.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|error| map_error(error.to_string()))?;
        let region: GuestRegionMmap =
            GuestRegionMmap::new(mapping, GuestAddress(saved.guest_address)).ok_or_else(|| {
                map_error("the region runs past the end of the address space".into())
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|error| MemoryError::Layout(error.to_string()))
}

/// Regions must be page-aligned, non-empty, in ascending order without
/// overlap, and packed one after another in the file.
fn check_layout(layout: &[SavedRegion]) -> Result<(), MemoryError> {
    if layout.is_empty() {
        return Err(MemoryError::Layout("there is no RAM region".into()));
    }
    let mut next_guest = 0u64;
    let mut next_offset = 0u64;
    for region in layout {
        let page = PAGE as u64;
        if region.size == 0 || region.size % page != 0 || region.guest_address % page != 0 {
            return Err(MemoryError::Layout(format!(
                "region at {:#x} of {:#x} bytes is not whole pages",
                region.guest_address, region.size
            )));
        }
        if region.guest_address < next_guest {
            return Err(MemoryError::Layout(format!(
                "region at {:#x} overlaps or precedes the one before it",
                region.guest_address
            )));
        }
        if region.file_offset != next_offset {
            return Err(MemoryError::Layout(format!(
                "region at {:#x} is at file offset {:#x}, expected {next_offset:#x}",
                region.guest_address, region.file_offset
            )));
        }
        next_guest = region
            .guest_address
            .checked_add(region.size)
            .ok_or_else(|| MemoryError::Layout("a region wraps the address space".into()))?;
        next_offset += region.size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn saved_memory_restores_the_same_bytes_and_leaves_zero_pages_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let source = memory(&[(0, 1 << 20), (0x10_0000_0000, 2 << 20)]);
        source
            .write_slice(b"first region", GuestAddress(0x2000))
            .unwrap();
        source
            .write_slice(b"second region", GuestAddress(0x10_0000_0000 + 0x1_0000))
            .unwrap();
        let (layout, written) = save(&source, &path).unwrap();
        assert_eq!(
            written,
            2 * PAGE as u64,
            "only the two touched pages are written"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
        let restored = map_private(&path, &layout).unwrap();
        let mut buffer = [0u8; 13];
        restored
            .read_slice(&mut buffer[..12], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(&buffer[..12], b"first region");
        restored
            .read_slice(&mut buffer, GuestAddress(0x10_0000_0000 + 0x1_0000))
            .unwrap();
        assert_eq!(&buffer, b"second region");
    }

    #[test]
    fn a_restored_vm_writes_its_own_copy_and_the_file_keeps_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let source = memory(&[(0, 1 << 20)]);
        source
            .write_obj(0x1111_1111u32, GuestAddress(0x3000))
            .unwrap();
        let (layout, _) = save(&source, &path).unwrap();
        let first = map_private(&path, &layout).unwrap();
        let second = map_private(&path, &layout).unwrap();
        first
            .write_obj(0x2222_2222u32, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(
            second.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0x1111_1111
        );
        let third = map_private(&path, &layout).unwrap();
        assert_eq!(
            third.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0x1111_1111
        );
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused_naming_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let (layout, _) = save(&memory(&[(0, 1 << 20)]), &path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let error = map_private(&path, &layout).unwrap_err().to_string();
        assert!(
            error.contains("holds 4096 bytes") && error.contains("need 1048576"),
            "{error}"
        );
    }

    #[test]
    fn overlapping_or_unaligned_regions_are_refused() {
        let overlap = [
            SavedRegion {
                guest_address: 0,
                size: 0x2000,
                file_offset: 0,
            },
            SavedRegion {
                guest_address: 0x1000,
                size: 0x1000,
                file_offset: 0x2000,
            },
        ];
        assert!(check_layout(&overlap)
            .unwrap_err()
            .to_string()
            .contains("overlaps"));
        let unaligned = [SavedRegion {
            guest_address: 0,
            size: 100,
            file_offset: 0,
        }];
        assert!(check_layout(&unaligned)
            .unwrap_err()
            .to_string()
            .contains("whole pages"));
        assert!(check_layout(&[]).is_err());
    }

    #[test]
    fn an_existing_memory_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, b"keep").unwrap();
        let error = save(&memory(&[(0, 1 << 20)]), &path)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot create the memory file"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
