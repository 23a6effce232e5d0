//! Giving a reported range of guest memory back to the host.
//!
//! [`check_range`] decides whether a range the guest reported may be
//! released: it must lie wholly inside one guest RAM region of the
//! `GuestMemoryMmap` (never in a hole, where the VMM maps MMIO, and never
//! across the boundary of two regions, even adjacent ones: each region is
//! its own host mapping), and only the whole host pages inside it are
//! released (rounded inward, so a byte the guest did not report is never
//! touched). The result, a [`Discard`], names the region and the page range
//! inside it; [`Discard::release`] then frees the host memory behind it the
//! way the region's backing needs:
//!
//! | backing | release | what the guest reads next |
//! | --- | --- | --- |
//! | private anonymous (the built-in VMM's `GuestMemoryMmap::from_ranges`) | `madvise(MADV_DONTNEED)` | zeros |
//! | shared file or memfd (QEMU-style `memory-backend-memfd`) | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` on the file | zeros: the hole, in every mapping of the file |
//! | shared anonymous | `madvise(MADV_REMOVE)` | zeros |
//! | private file | `madvise(MADV_DONTNEED)` (drops the private copies) | the file's contents |
//!
//! `MADV_DONTNEED` on a shared mapping would only unmap the pages and free
//! nothing, hence the other two calls. A hole punched in a shared file is
//! punched for everyone who maps it: that is the point for a memfd that
//! only holds guest RAM, and the reason a VMM must not give the guest a
//! balloon over guest RAM mapped from a file whose contents it must keep. KVM follows every one of these
//! through its MMU notifier: the guest's next access faults in the new
//! page. A confined worker (the built-in VMM's) may only `madvise`: that
//! VMM's guest memory is private (anonymous, or a template's file mapped
//! `MAP_PRIVATE`), and a device thread is allowed no `fallocate`, so a
//! compromised worker cannot punch holes in a file it holds
//! (`husk_confine::syscalls`).

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::{HOST_PAGE_SIZE, MAX_REPORT_DESCRIPTORS};

/// Why a reported descriptor is skipped.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeRefused {
    /// Reported ranges are device-writable buffers (virtio 1.2, 5.5.6.7).
    #[error("reported range {addr:#x} (+{len:#x}) is device-readable")]
    DeviceReadable { addr: u64, len: u64 },
    /// The range runs past the end of the guest-physical address space.
    #[error("reported range {addr:#x} (+{len:#x}) wraps around the address space")]
    Wraps { addr: u64, len: u64 },
    /// The range starts where the guest has no RAM (a hole, MMIO).
    #[error("reported range {addr:#x} (+{len:#x}) starts outside guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    /// The range runs past the end of the RAM region it starts in.
    #[error("reported range {addr:#x} (+{len:#x}) runs past the end of its RAM region at {region_end:#x}")]
    CrossesRegion {
        addr: u64,
        len: u64,
        region_end: u64,
    },
    /// Rounded inward to host pages, nothing is left.
    #[error("reported range {addr:#x} (+{len:#x}) holds no whole {HOST_PAGE_SIZE}-byte page")]
    NoWholePage { addr: u64, len: u64 },
    /// The chain has more descriptors than the device acts on.
    #[error("reporting chain {head} has more than {MAX_REPORT_DESCRIPTORS} descriptors")]
    TooManyDescriptors { head: u16 },
}

/// Why the host did not release a range that passed the checks.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// `madvise` failed.
    #[error("madvise({advice}) of guest range {addr:#x} (+{len:#x}) failed: {source}")]
    Madvise {
        advice: &'static str,
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    /// `fallocate(PUNCH_HOLE)` on the region's file failed.
    #[error("punching a hole for guest range {addr:#x} (+{len:#x}) at file offset {file_offset:#x} failed: {source}")]
    PunchHole {
        addr: u64,
        len: u64,
        file_offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Whole host pages inside one guest RAM region, cleared for release.
#[derive(Debug)]
pub struct Discard<'a> {
    region: &'a GuestRegionMmap,
    /// Guest-physical address of the first page.
    addr: GuestAddress,
    /// Offset of the first page inside the region.
    offset: u64,
    /// Bytes to release, a multiple of [`HOST_PAGE_SIZE`].
    len: u64,
}

/// Checks a reported range of `len` bytes at `addr` against guest RAM and
/// rounds it inward to whole host pages.
pub fn check_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<Discard<'_>, RangeRefused> {
    let raw = addr.0;
    let end = raw
        .checked_add(len)
        .ok_or(RangeRefused::Wraps { addr: raw, len })?;
    let region = mem
        .find_region(addr)
        .ok_or(RangeRefused::OutsideRam { addr: raw, len })?;
    let region_start = region.start_addr().0;
    // A region's mapping fits the address space (vm-memory checks it when
    // the region is made), so its end does too.
    let region_end = region_start + region.len();
    if end > region_end {
        return Err(RangeRefused::CrossesRegion {
            addr: raw,
            len,
            region_end,
        });
    }
    // Pages are rounded in the region's own offsets: its host mapping
    // starts on a page, so these are host pages whatever the region's
    // guest address (KVM makes both page-aligned anyway). Both ends stay
    // inside the region, so neither rounding can overflow.
    let start_offset = raw - region_start;
    let end_offset = end - region_start;
    let first_page = start_offset.next_multiple_of(HOST_PAGE_SIZE);
    let pages_end = end_offset - end_offset % HOST_PAGE_SIZE;
    if first_page >= pages_end {
        return Err(RangeRefused::NoWholePage { addr: raw, len });
    }
    Ok(Discard {
        region,
        addr: GuestAddress(region_start + first_page),
        offset: first_page,
        len: pages_end - first_page,
    })
}

impl Discard<'_> {
    /// Bytes released, a multiple of [`HOST_PAGE_SIZE`].
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Frees the host memory behind the pages (see the module table).
    pub fn release(&self) -> Result<(), DiscardError> {
        let shared = self.region.flags() & libc::MAP_SHARED != 0;
        match (shared, self.region.file_offset()) {
            (true, Some(file)) => self.punch_hole(file),
            (true, None) => self.madvise(libc::MADV_REMOVE, "MADV_REMOVE"),
            (false, _) => self.madvise(libc::MADV_DONTNEED, "MADV_DONTNEED"),
        }
    }

    fn madvise(&self, advice: libc::c_int, name: &'static str) -> Result<(), DiscardError> {
        // In bounds: `check_range` put [offset, offset + len) inside the
        // region's mapping.
        let host = self.region.as_ptr().wrapping_add(self.offset as usize);
        // SAFETY: [host, host + len) is inside this region's mapping,
        // which the GuestMemoryMmap keeps mapped while `self` borrows it,
        // and page-aligned (the mapping starts on a page; offset and len
        // are page multiples). Guest memory is only ever accessed volatilely, with no
        // Rust references into it, so its contents changing to zeros (or
        // to the file's) under other threads is what the guest itself
        // asked for and breaks no invariant.
        let ret = unsafe { libc::madvise(host.cast(), self.len as usize, advice) };
        if ret != 0 {
            return Err(DiscardError::Madvise {
                advice: name,
                addr: self.addr.0,
                len: self.len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn punch_hole(&self, file: &vm_memory::FileOffset) -> Result<(), DiscardError> {
        // The mapping covers [start, start + region len) of the file, and
        // mmap took that range as an off_t, so the sum fits one.
        let file_offset = file.start() + self.offset;
        // SAFETY: plain integer arguments on an fd the region owns; the
        // hole lies inside the part of the file this region maps (see
        // `madvise` for why the contents may change under other threads).
        let ret = unsafe {
            libc::fallocate(
                file.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                file_offset as libc::off_t,
                self.len as libc::off_t,
            )
        };
        if ret != 0 {
            return Err(DiscardError::PunchHole {
                addr: self.addr.0,
                len: self.len,
                file_offset,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}
