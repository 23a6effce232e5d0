//! The Linux x86 boot protocol's zero page (`struct boot_params`).
//!
//! Built per Documentation/arch/x86/boot.rst: start from the setup header of
//! a bzImage (so fields the kernel publishes, such as `cmdline_size` and
//! `kernel_alignment`, stay as the kernel set them) or from an empty header
//! for an ELF vmlinux, fill in the fields a boot loader owns (loader type,
//! command line, initrd, E820 table), and write the 4 KiB page at
//! `ZERO_PAGE_START`, whose address goes into RSI at the 64-bit entry.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, LOADED_HIGH};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{validate_boot_config, BootError, LinuxBootConfig};
use super::e820::build_e820_map;
use super::layout::ZERO_PAGE_START;

/// `boot_flag` value every boot sector carries.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value of a protocol >= 2.00 setup header: "HdrS" little-endian.
pub const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID (boot.rst).
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Physical alignment advertised for an ELF vmlinux, which carries no setup
/// header: 16 MiB, the largest `CONFIG_PHYSICAL_ALIGN` x86_64 allows, so it
/// satisfies any kernel (bzImages publish their own value, kept as is).
pub const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// First boot protocol version whose header carries `cmdline_size` (2.06).
pub const SETUP_VERSION_CMDLINE_SIZE: u16 = 0x0206;
/// Command line limit, without the NUL, of kernels before protocol 2.06.
pub const LEGACY_CMDLINE_MAX: usize = 255;
/// Capacity of `boot_params.e820_table` (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Builds the zero page for `cfg` over the memory map of `mem`, without
/// writing it (the pure half of [`configure_zero_page`]).
pub fn build_zero_page(
    mem: &GuestMemoryMmap,
    cfg: &LinuxBootConfig,
) -> Result<boot_params, BootError> {
    validate_boot_config(mem, cfg)?;

    let mut params = boot_params::default();
    match cfg.setup_header {
        Some(hdr) => {
            // Protocol 2.06+ kernels publish their command line limit
            // (without the NUL); older ones take 255 bytes.
            let kernel_max = if hdr.version >= SETUP_VERSION_CMDLINE_SIZE {
                hdr.cmdline_size as usize
            } else {
                LEGACY_CMDLINE_MAX
            };
            if cfg.cmdline_size - 1 > kernel_max {
                return Err(BootError::CmdlineTooLong {
                    size: cfg.cmdline_size,
                    max: kernel_max + 1,
                });
            }
            params.hdr = hdr;
        }
        None => {
            params.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
            // The field the kernel publishes as its limit; an ELF kernel has
            // no header, so tell it what we actually pass (without the NUL).
            params.hdr.cmdline_size = (cfg.cmdline_size - 1) as u32;
        }
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = SETUP_HEADER_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    // The kernel sits at or above 1 MiB (protected-mode kernel loaded high).
    params.hdr.loadflags |= LOADED_HIGH as u8;

    let (cmdline_lo, cmdline_hi) = split_u64(cfg.cmdline_addr.raw_value());
    params.hdr.cmd_line_ptr = cmdline_lo;
    params.ext_cmd_line_ptr = cmdline_hi;

    if let Some((addr, size)) = cfg.initrd {
        let (image_lo, image_hi) = split_u64(addr.raw_value());
        let (size_lo, size_hi) = split_u64(size as u64);
        params.hdr.ramdisk_image = image_lo;
        params.ext_ramdisk_image = image_hi;
        params.hdr.ramdisk_size = size_lo;
        params.ext_ramdisk_size = size_hi;
    }

    let map = build_e820_map(mem);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TooManyMemoryMapEntries {
            count: map.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
            what: "zero page e820_table",
        });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind.e820_type(),
        };
    }
    // Bounded by E820_MAX_ENTRIES_ZEROPAGE (128) just above.
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page for `cfg` at `ZERO_PAGE_START`.
pub fn configure_zero_page(mem: &GuestMemoryMmap, cfg: &LinuxBootConfig) -> Result<(), BootError> {
    let params = build_zero_page(mem, cfg)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestMemoryWrite {
            what: "zero page",
            addr: ZERO_PAGE_START,
            source,
        })
}

/// Low and high 32-bit halves of `value` (the zero page splits 64-bit
/// addresses into a `hdr` field and an `ext_` field).
fn split_u64(value: u64) -> (u32, u32) {
    (value as u32, (value >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::e820::{E820_TYPE_RAM, E820_TYPE_RESERVED};
    use crate::x86_64::layout::{guest_memory_regions, CMDLINE_START, EBDA_START};
    use linux_loader::loader::bootparam::setup_header;

    const MIB: u64 = 1 << 20;

    fn mem_of(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&guest_memory_regions(size).unwrap()).unwrap()
    }

    fn config(initrd: Option<(GuestAddress, usize)>) -> LinuxBootConfig {
        LinuxBootConfig {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 20,
            initrd,
            setup_header: None,
        }
    }

    #[test]
    fn zero_page_read_back_has_magic_cmdline_initrd_and_e820() {
        let mem = mem_of(128 * MIB);
        let initrd = (GuestAddress(100 * MIB), 3 * MIB as usize);
        configure_zero_page(&mem, &config(Some(initrd))).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 19);
        assert_eq!({ hdr.ramdisk_image }, (100 * MIB) as u32);
        assert_eq!({ hdr.ramdisk_size }, (3 * MIB) as u32);
        assert_eq!({ hdr.kernel_alignment }, ELF_KERNEL_ALIGNMENT);
        assert_eq!(hdr.loadflags & LOADED_HIGH as u8, LOADED_HIGH as u8);
        assert_eq!({ params.ext_cmd_line_ptr }, 0);
        assert_eq!({ params.ext_ramdisk_image }, 0);
        assert_eq!(params.e820_entries, 3);
        let table = params.e820_table;
        let e = |i: usize| (table[i].addr, table[i].size, table[i].type_);
        assert_eq!(e(0), (0, EBDA_START, E820_TYPE_RAM));
        assert_eq!(
            e(1),
            (EBDA_START, 0x100000 - EBDA_START, E820_TYPE_RESERVED)
        );
        assert_eq!(e(2), (0x100000, 128 * MIB - 0x100000, E820_TYPE_RAM));
    }

    #[test]
    fn bzimage_header_fields_are_kept() {
        let mem = mem_of(64 * MIB);
        let mut hdr = setup_header {
            kernel_alignment: 0x20_0000,
            cmdline_size: 2047,
            version: 0x020f,
            ..Default::default()
        };
        hdr.loadflags = 0x80;
        let mut cfg = config(None);
        cfg.setup_header = Some(hdr);
        let params = build_zero_page(&mem, &cfg).unwrap();
        let out = params.hdr;
        assert_eq!({ out.kernel_alignment }, 0x20_0000);
        assert_eq!({ out.cmdline_size }, 2047);
        assert_eq!({ out.version }, 0x020f);
        assert_eq!(out.loadflags, 0x81);
        assert_eq!({ out.header }, SETUP_HEADER_MAGIC);
        assert_eq!({ out.ramdisk_image }, 0);
    }

    #[test]
    fn cmdline_longer_than_the_bzimage_limit_is_rejected() {
        let mem = mem_of(64 * MIB);
        let mut cfg = config(None);
        cfg.cmdline_size = 300;
        cfg.setup_header = Some(setup_header {
            version: 0x0206,
            cmdline_size: 255,
            ..Default::default()
        });
        let Err(err) = build_zero_page(&mem, &cfg) else {
            panic!("command line over the kernel's limit accepted");
        };
        assert!(matches!(
            err,
            BootError::CmdlineTooLong {
                size: 300,
                max: 256
            }
        ));
        cfg.cmdline_size = 256;
        assert!(build_zero_page(&mem, &cfg).is_ok());
    }

    #[test]
    fn bad_cmdline_and_initrd_are_rejected_with_context() {
        let mem = mem_of(64 * MIB);
        let mut cfg = config(None);
        cfg.cmdline_size = 0;
        assert!(matches!(
            build_zero_page(&mem, &cfg),
            Err(BootError::CmdlineEmpty)
        ));
        cfg.cmdline_size = 4096;
        let Err(err) = build_zero_page(&mem, &cfg) else {
            panic!("oversized command line accepted");
        };
        assert_eq!(
            err.to_string(),
            "command line of 4096 bytes exceeds the limit of 2048 bytes"
        );
        let cfg = config(Some((GuestAddress(63 * MIB), 2 * MIB as usize)));
        let Err(err) = build_zero_page(&mem, &cfg) else {
            panic!("initrd past the end of memory accepted");
        };
        assert!(matches!(err, BootError::InitrdOutsideMemory { addr, .. } if addr == 63 * MIB));
    }
}
