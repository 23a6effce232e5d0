//! Loading the guest: the kernel image (ELF `vmlinux` with a 64-bit or PVH
//! entry, or `bzImage`), the initrd, and the kernel command line.
//!
//! The image format is recognised by its magic, not its file name, so a
//! corrupt or foreign file is rejected with a message that says what was
//! expected.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use husk_arch::{BootProtocol, CMDLINE_MAX_SIZE};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Offset of the 64-bit entry point from the start of a bzImage's
/// protected-mode code (x86 boot protocol, "64-bit BOOT PROTOCOL").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Where a bzImage keeps its "HdrS" setup-header magic.
const BZIMAGE_HEADER_MAGIC_OFFSET: u64 = 0x202;

/// Which entry point to use when the kernel offers several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocolChoice {
    /// PVH when the ELF kernel has a PVH note, else the 64-bit entry.
    #[default]
    Auto,
    /// Always the 64-bit Linux boot protocol (zero page in RSI).
    Linux64,
    /// PVH (start info in EBX); fails if the kernel has no PVH note.
    Pvh,
}

/// Errors from loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open the kernel image {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the kernel image {path} is neither an ELF vmlinux nor a bzImage (no ELF or HdrS magic)"
    )]
    UnknownKernelFormat { path: PathBuf },
    #[error("cannot load the kernel image {path} into guest memory: {detail}")]
    LoadKernel { path: PathBuf, detail: String },
    #[error(
        "the kernel image {path} has no PVH entry note, but the PVH boot protocol was requested"
    )]
    NoPvhEntry { path: PathBuf },
    #[error("PVH boot needs an ELF vmlinux; {path} is a bzImage")]
    PvhNeedsElf { path: PathBuf },
    #[error("cannot read the initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the initrd {path} ({size} bytes) does not fit in guest memory above the kernel: {detail}"
    )]
    InitrdDoesNotFit {
        path: PathBuf,
        size: usize,
        detail: String,
    },
    #[error("the kernel command line is {length} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { length: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("cannot write {what} to guest memory at {address:#x}: {detail}")]
    GuestWrite {
        what: &'static str,
        address: u64,
        detail: String,
    },
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
    pub setup_header: Option<setup_header>,
    /// First guest address past the kernel image.
    pub kernel_end: u64,
}

enum ImageFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<ImageFormat, LoadError> {
    let open_error = |source| LoadError::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let mut elf_magic = [0u8; 4];
    let mut hdrs_magic = [0u8; 4];
    let read_elf = file.read_exact(&mut elf_magic).is_ok();
    let read_hdrs = file
        .seek(SeekFrom::Start(BZIMAGE_HEADER_MAGIC_OFFSET))
        .is_ok()
        && file.read_exact(&mut hdrs_magic).is_ok();
    file.seek(SeekFrom::Start(0)).map_err(open_error)?;
    if read_elf && &elf_magic == b"\x7fELF" {
        Ok(ImageFormat::Elf)
    } else if read_hdrs && &hdrs_magic == b"HdrS" {
        Ok(ImageFormat::BzImage)
    } else {
        Err(LoadError::UnknownKernelFormat {
            path: path.to_owned(),
        })
    }
}

/// Loads the kernel at `path` into `memory`.
pub fn load_kernel(
    memory: &GuestMemoryMmap,
    path: &Path,
    choice: BootProtocolChoice,
) -> Result<LoadedKernel, LoadError> {
    let mut file = File::open(path).map_err(|source| LoadError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let format = detect_format(&mut file, path)?;
    let highmem = Some(GuestAddress(husk_arch::HIMEM_START));
    let load_error = |detail: String| LoadError::LoadKernel {
        path: path.to_owned(),
        detail,
    };
    match format {
        ImageFormat::Elf => {
            let result = Elf::load(memory, None, &mut file, highmem)
                .map_err(|e| load_error(e.to_string()))?;
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Some(entry),
                _ => None,
            };
            let (entry, protocol) = match (choice, pvh_entry) {
                (BootProtocolChoice::Auto | BootProtocolChoice::Pvh, Some(entry)) => {
                    (entry, BootProtocol::Pvh)
                }
                (BootProtocolChoice::Pvh, None) => {
                    return Err(LoadError::NoPvhEntry {
                        path: path.to_owned(),
                    })
                }
                _ => (result.kernel_load, BootProtocol::LinuxBoot64),
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                setup_header: None,
                kernel_end: result.kernel_end,
            })
        }
        ImageFormat::BzImage => {
            if choice == BootProtocolChoice::Pvh {
                return Err(LoadError::PvhNeedsElf {
                    path: path.to_owned(),
                });
            }
            let result = BzImage::load(memory, None, &mut file, highmem)
                .map_err(|e| load_error(e.to_string()))?;
            Ok(LoadedKernel {
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                protocol: BootProtocol::LinuxBoot64,
                setup_header: result.setup_header,
                kernel_end: result.kernel_end,
            })
        }
    }
}

/// Loads the initrd at the top of low memory; returns its address and size.
pub fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, usize), LoadError> {
    let image = std::fs::read(path).map_err(|source| LoadError::ReadInitrd {
        path: path.to_owned(),
        source,
    })?;
    let does_not_fit = |detail: String| LoadError::InitrdDoesNotFit {
        path: path.to_owned(),
        size: image.len(),
        detail,
    };
    let address =
        husk_arch::initrd_load_address_above(memory, image.len(), GuestAddress(kernel_end))
            .map_err(|e| does_not_fit(e.to_string()))?;
    memory
        .write_slice(&image, address)
        .map_err(|e| LoadError::GuestWrite {
            what: "the initrd",
            address: address.0,
            detail: e.to_string(),
        })?;
    Ok((address, image.len()))
}

/// A virtio-mmio device as the kernel's `virtio_mmio.device=` parameter
/// describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The command line the guest sees: the caller's, then one
/// `virtio_mmio.device=<size>@<base>:<irq>` per device.
pub fn assemble_cmdline(base: &str, devices: &[MmioDeviceSlot]) -> Result<String, LoadError> {
    let mut cmdline = base.trim().to_owned();
    for device in devices {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            device.size / 1024,
            device.base,
            device.irq
        ));
    }
    if cmdline.contains('\0') {
        return Err(LoadError::CmdlineHasNul);
    }
    // The kernel copies at most COMMAND_LINE_SIZE bytes including the NUL.
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(LoadError::CmdlineTooLong {
            length: cmdline.len(),
        });
    }
    Ok(cmdline)
}

/// Writes the NUL-terminated command line at `CMDLINE_START`; returns its
/// size including the NUL.
pub fn write_cmdline(memory: &GuestMemoryMmap, cmdline: &str) -> Result<usize, LoadError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(husk_arch::CMDLINE_START))
        .map_err(|e| LoadError::GuestWrite {
            what: "the kernel command line",
            address: husk_arch::CMDLINE_START,
            detail: e.to_string(),
        })?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lists_each_mmio_device_after_the_base() {
        let devices = [
            MmioDeviceSlot {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceSlot {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let cmdline = assemble_cmdline(" console=ttyS0 reboot=k ", &devices).unwrap();
        assert_eq!(
            cmdline,
            "console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(
            assemble_cmdline("", &devices[..1]).unwrap(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn cmdline_longer_than_the_kernel_accepts_is_rejected() {
        let fits = "a".repeat(CMDLINE_MAX_SIZE - 1);
        assert!(assemble_cmdline(&fits, &[]).is_ok());
        let too_long = "a".repeat(CMDLINE_MAX_SIZE);
        let error = assemble_cmdline(&too_long, &[]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("{} bytes", CMDLINE_MAX_SIZE)),
            "{error}"
        );
        assert!(matches!(
            assemble_cmdline("a\0b", &[]),
            Err(LoadError::CmdlineHasNul)
        ));
    }

    #[test]
    fn a_file_that_is_no_kernel_is_rejected_by_format() {
        let dir = std::env::temp_dir().join(format!("husk-loader-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::write(&path, vec![0x55u8; 4096]).unwrap();
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let error = load_kernel(&memory, &path, BootProtocolChoice::Auto).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            matches!(error, LoadError::UnknownKernelFormat { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not-a-kernel"));
    }

    #[test]
    fn a_missing_kernel_names_its_path() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let error = load_kernel(
            &memory,
            Path::new("/nonexistent/vmlinux"),
            BootProtocolChoice::Auto,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/vmlinux"),
            "{error}"
        );
    }
}
