//! What the Linux (zero page) and PVH boot protocols share.
//!
//! The VMM loads the kernel, command line and initrd into guest memory and
//! describes them once in a [`LinuxBootConfig`]; `zero_page` and `pvh` turn
//! that into their protocol's structure. The checks every protocol needs
//! (command line and initrd inside guest memory, command line size) live
//! here, and so does the error type both writers return.

use linux_loader::loader::bootparam::setup_header;
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap};

use super::layout::CMDLINE_MAX_SIZE;

/// Where the VMM put the pieces the kernel needs to find.
#[derive(Debug, Clone, Copy)]
pub struct LinuxBootConfig {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: GuestAddress,
    /// Size of the command line in bytes, including the terminating NUL.
    pub cmdline_size: usize,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(GuestAddress, usize)>,
    /// The setup header read from a bzImage; `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
}

/// Errors while writing boot information for the guest.
#[derive(Debug, Error)]
pub enum BootError {
    /// The command line size is zero (it must at least hold the NUL).
    #[error("command line size is 0; it must include the terminating NUL")]
    CmdlineEmpty,
    /// The command line is larger than the kernel's buffer.
    #[error("command line of {size} bytes exceeds the limit of {max} bytes")]
    CmdlineTooLong {
        /// Size including the NUL.
        size: usize,
        /// Largest accepted size including the NUL.
        max: usize,
    },
    /// The command line lies (partly) outside guest memory.
    #[error("command line at {addr:#x} of {size} bytes is outside guest memory")]
    CmdlineOutsideMemory {
        /// Guest address of the command line.
        addr: u64,
        /// Size including the NUL.
        size: usize,
    },
    /// The initrd lies (partly) outside guest memory.
    #[error("initrd at {addr:#x} of {size} bytes is outside guest memory")]
    InitrdOutsideMemory {
        /// Guest address of the initrd.
        addr: u64,
        /// Size in bytes.
        size: usize,
    },
    /// The memory map has more entries than the boot structure holds.
    #[error("memory map has {count} entries, the {what} holds at most {max}")]
    TooManyMemoryMapEntries {
        /// Number of entries built.
        count: usize,
        /// Capacity of the structure.
        max: usize,
        /// Which structure.
        what: &'static str,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {what} at {addr:#x} to guest memory: {source}")]
    GuestMemoryWrite {
        /// Which structure.
        what: &'static str,
        /// Guest address it was written to.
        addr: u64,
        /// The guest memory error.
        source: GuestMemoryError,
    },
}

/// Checks the command line and initrd of `cfg` against `mem` and the
/// protocol-independent limits.
pub(crate) fn validate_boot_config(
    mem: &GuestMemoryMmap,
    cfg: &LinuxBootConfig,
) -> Result<(), BootError> {
    if cfg.cmdline_size == 0 {
        return Err(BootError::CmdlineEmpty);
    }
    if cfg.cmdline_size > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            size: cfg.cmdline_size,
            max: CMDLINE_MAX_SIZE,
        });
    }
    if !range_in_memory(mem, cfg.cmdline_addr, cfg.cmdline_size) {
        return Err(BootError::CmdlineOutsideMemory {
            addr: cfg.cmdline_addr.raw_value(),
            size: cfg.cmdline_size,
        });
    }
    if let Some((addr, size)) = cfg.initrd {
        if !range_in_memory(mem, addr, size) {
            return Err(BootError::InitrdOutsideMemory {
                addr: addr.raw_value(),
                size,
            });
        }
    }
    Ok(())
}

/// Whether `[addr, addr + size)` is backed by guest memory (an empty range
/// only needs a valid start).
fn range_in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, size: usize) -> bool {
    if size == 0 {
        return mem.address_in_range(addr);
    }
    mem.check_range(addr, size)
}
