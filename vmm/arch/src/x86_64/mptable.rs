//! The Intel MultiProcessor Specification 1.4 table that announces the vCPUs
//! and the IOAPIC to a guest booted without ACPI.
//!
//! Built as one byte image placed at `EBDA_START` (the last KiB of base
//! memory, where Linux's `smp_scan_config` looks): the 16-byte floating
//! pointer, then the configuration table it points to — header, one
//! processor entry per vCPU (APIC id = vCPU index, vCPU 0 the bootstrap
//! processor), one ISA bus, one IOAPIC (id = vCPU count), one I/O interrupt
//! entry per IOAPIC pin (ISA IRQ n to pin n, matching KVM's default GSI
//! routing) and the two local interrupt entries (ExtINT on LINT0, NMI on
//! LINT1). Both structures carry a byte checksum. A small parser reads the
//! image back for tests and for the VMM's own checks.

use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, HIMEM_START, IOAPIC_ADDR, IOAPIC_NUM_PINS};

/// Most vCPUs the table describes. Bound by the 8-bit xAPIC id space, not by
/// room: ids 0..=253 are the vCPUs, the IOAPIC takes the next id (254 at most)
/// and 255 is the broadcast id. The table for 254 vCPUs is 5,364 bytes, far
/// inside the reserved `EBDA_START`..`HIMEM_START` region (checked below).
pub const MAX_SUPPORTED_CPUS: u32 = 254;

/// Where the floating pointer (and right after it the table) is written.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the region reserved for the MP table (the E820 map reserves it).
pub const MPTABLE_REGION_END: u64 = HIMEM_START;

const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// MP spec revision 1.4 is encoded as 4 in both structures.
const MP_SPEC_REV: u8 = 4;
const OEM_ID: [u8; 8] = *b"HUSK    ";
const PRODUCT_ID: [u8; 12] = *b"HUSK MICROVM";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor entry flag: the processor is usable.
pub const CPU_FLAG_ENABLED: u8 = 1 << 0;
/// Processor entry flag: the bootstrap processor.
pub const CPU_FLAG_BSP: u8 = 1 << 1;
/// Local APIC version KVM's in-kernel LAPIC reports (integrated xAPIC).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version KVM's in-kernel IOAPIC reports.
const IOAPIC_VERSION: u8 = 0x11;
/// IOAPIC entry flag: usable.
const IOAPIC_FLAG_ENABLED: u8 = 1;
/// CPU signature in processor entries: family 6 (the guest reads the real
/// one from CPUID; Linux only uses this for pre-CPUID processors).
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags in processor entries: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Interrupt types of interrupt entries (MP spec table 4-8).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt entry flags 0: polarity and trigger mode conform to the bus.
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: [u8; 6] = *b"ISA   ";
/// Destination local APIC id for "all local APICs".
const ALL_LAPICS: u8 = 0xff;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpFloatingPointer {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    spec_rev: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3: [u8; 3],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpConfigHeader {
    signature: [u8; 4],
    base_table_length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table_pointer: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_addr: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpProcessorEntry {
    entry_type: u8,
    lapic_id: u8,
    lapic_version: u8,
    cpu_flags: u8,
    cpu_signature: u32,
    feature_flags: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpBusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpIoapicEntry {
    entry_type: u8,
    id: u8,
    version: u8,
    flags: u8,
    addr: u32,
}

/// Same layout for I/O (type 3) and local (type 4) interrupt entries; `dst_id`
/// and `dst_pin` are the IOAPIC id and INTIN pin, or the LAPIC id and LINTIN.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpInterruptEntry {
    entry_type: u8,
    int_type: u8,
    flags: u16,
    src_bus_id: u8,
    src_bus_irq: u8,
    dst_id: u8,
    dst_pin: u8,
}

// SAFETY: all are packed structs of integers and integer arrays: no padding,
// no invalid bit patterns, so any byte sequence of their size is a value.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: see above.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: see above.
unsafe impl ByteValued for MpProcessorEntry {}
// SAFETY: see above.
unsafe impl ByteValued for MpBusEntry {}
// SAFETY: see above.
unsafe impl ByteValued for MpIoapicEntry {}
// SAFETY: see above.
unsafe impl ByteValued for MpInterruptEntry {}

const FP_SIZE: usize = std::mem::size_of::<MpFloatingPointer>();
const HEADER_SIZE: usize = std::mem::size_of::<MpConfigHeader>();
const PROCESSOR_SIZE: usize = std::mem::size_of::<MpProcessorEntry>();
/// Every entry other than a processor entry is 8 bytes.
const SMALL_ENTRY_SIZE: usize = 8;
/// Local interrupt entries: LINT0 and LINT1.
const NUM_LOCAL_INTERRUPTS: usize = 2;

const _: () = assert!(FP_SIZE == 16 && HEADER_SIZE == 44 && PROCESSOR_SIZE == 20);
const _: () = assert!(std::mem::size_of::<MpBusEntry>() == SMALL_ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<MpIoapicEntry>() == SMALL_ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<MpInterruptEntry>() == SMALL_ENTRY_SIZE);
const _: () =
    assert!(MPTABLE_START + mptable_size(MAX_SUPPORTED_CPUS as usize) as u64 <= MPTABLE_REGION_END);

/// Errors building, writing or reading the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// A VM needs at least one vCPU.
    #[error("cannot build an MP table for 0 vCPUs")]
    ZeroCpus,
    /// More vCPUs than the table can describe.
    #[error("cannot build an MP table for {num_cpus} vCPUs, the maximum is {max}")]
    TooManyCpus {
        /// Requested vCPU count.
        num_cpus: u32,
        /// `MAX_SUPPORTED_CPUS`.
        max: u32,
    },
    /// Writing the table to guest memory failed.
    #[error("cannot write the MP table ({size} bytes) at {addr:#x}: {source}")]
    GuestMemoryWrite {
        /// Guest address of the table.
        addr: u64,
        /// Bytes to write.
        size: usize,
        /// The guest memory error.
        source: GuestMemoryError,
    },
    /// Reading the table from guest memory failed.
    #[error("cannot read the MP {what} at {addr:#x}: {source}")]
    GuestMemoryRead {
        /// Which structure.
        what: &'static str,
        /// Guest address read from.
        addr: u64,
        /// The guest memory error.
        source: GuestMemoryError,
    },
    /// A structure does not carry its signature.
    #[error("no MP {what} at {addr:#x}: signature is {found:?}")]
    BadSignature {
        /// Which structure.
        what: &'static str,
        /// Guest address of the structure.
        addr: u64,
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// A structure's bytes do not sum to zero.
    #[error("MP {what} at {addr:#x} has a bad checksum (bytes sum to {sum:#x})")]
    BadChecksum {
        /// Which structure.
        what: &'static str,
        /// Guest address of the structure.
        addr: u64,
        /// The byte sum found (0 when correct).
        sum: u8,
    },
    /// An entry of a type this parser does not know.
    #[error("MP table entry at {addr:#x} has unknown type {entry_type}")]
    UnknownEntryType {
        /// Guest address of the entry.
        addr: u64,
        /// Its type byte.
        entry_type: u8,
    },
}

/// Size in bytes of the floating pointer plus configuration table for
/// `num_cpus` vCPUs.
pub const fn mptable_size(num_cpus: usize) -> usize {
    FP_SIZE
        + HEADER_SIZE
        + num_cpus * PROCESSOR_SIZE
        + SMALL_ENTRY_SIZE // ISA bus
        + SMALL_ENTRY_SIZE // IOAPIC
        + IOAPIC_NUM_PINS as usize * SMALL_ENTRY_SIZE
        + NUM_LOCAL_INTERRUPTS * SMALL_ENTRY_SIZE
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(byte_sum(bytes))
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Builds the MP table image for `num_cpus` vCPUs as it must appear at
/// `MPTABLE_START` (the pure half of [`setup_mptable`]).
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::ZeroCpus);
    }
    if u32::from(num_cpus) > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus {
            num_cpus: num_cpus.into(),
            max: MAX_SUPPORTED_CPUS,
        });
    }
    let ioapic_id = num_cpus;

    let mut entries: Vec<u8> = Vec::with_capacity(mptable_size(num_cpus.into()));
    let mut entry_count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        entry_count += 1;
    };
    for cpu in 0..num_cpus {
        let mut cpu_flags = CPU_FLAG_ENABLED;
        if cpu == 0 {
            cpu_flags |= CPU_FLAG_BSP;
        }
        push(
            MpProcessorEntry {
                entry_type: ENTRY_PROCESSOR,
                lapic_id: cpu,
                lapic_version: LAPIC_VERSION,
                cpu_flags,
                cpu_signature: CPU_SIGNATURE,
                feature_flags: CPU_FEATURES,
                reserved: [0; 2],
            }
            .as_slice(),
        );
    }
    push(
        MpBusEntry {
            entry_type: ENTRY_BUS,
            bus_id: ISA_BUS_ID,
            bus_type: ISA_BUS_TYPE,
        }
        .as_slice(),
    );
    push(
        MpIoapicEntry {
            entry_type: ENTRY_IOAPIC,
            id: ioapic_id,
            version: IOAPIC_VERSION,
            flags: IOAPIC_FLAG_ENABLED,
            addr: IOAPIC_ADDR as u32,
        }
        .as_slice(),
    );
    for pin in 0..IOAPIC_NUM_PINS as u8 {
        push(
            MpInterruptEntry {
                entry_type: ENTRY_IO_INTERRUPT,
                int_type: INT_TYPE_INT,
                flags: INT_FLAGS_CONFORM,
                src_bus_id: ISA_BUS_ID,
                src_bus_irq: pin,
                dst_id: ioapic_id,
                dst_pin: pin,
            }
            .as_slice(),
        );
    }
    for (lint, int_type) in [(0u8, INT_TYPE_EXTINT), (1u8, INT_TYPE_NMI)] {
        push(
            MpInterruptEntry {
                entry_type: ENTRY_LOCAL_INTERRUPT,
                int_type,
                flags: INT_FLAGS_CONFORM,
                src_bus_id: ISA_BUS_ID,
                src_bus_irq: 0,
                dst_id: ALL_LAPICS,
                dst_pin: lint,
            }
            .as_slice(),
        );
    }

    let config_addr = MPTABLE_START + FP_SIZE as u64;
    let mut header = MpConfigHeader {
        signature: MPC_SIGNATURE,
        // At most mptable_size(254) = 5,364 bytes (const-checked above).
        base_table_length: (HEADER_SIZE + entries.len()) as u16,
        spec_rev: MP_SPEC_REV,
        checksum: 0,
        oem_id: OEM_ID,
        product_id: PRODUCT_ID,
        oem_table_pointer: 0,
        oem_table_size: 0,
        entry_count,
        lapic_addr: APIC_ADDR as u32,
        ext_table_length: 0,
        ext_table_checksum: 0,
        reserved: 0,
    };
    header.checksum = checksum(header.as_slice()).wrapping_sub(byte_sum(&entries));

    let mut fp = MpFloatingPointer {
        signature: MPF_SIGNATURE,
        physptr: config_addr as u32,
        // Length in 16-byte paragraphs.
        length: 1,
        spec_rev: MP_SPEC_REV,
        checksum: 0,
        // 0: a configuration table is present (no default configuration).
        feature1: 0,
        // Bit 7 clear: no IMCR, virtual wire mode.
        feature2: 0,
        feature3: [0; 3],
    };
    fp.checksum = checksum(fp.as_slice());

    let mut image = Vec::with_capacity(mptable_size(num_cpus.into()));
    image.extend_from_slice(fp.as_slice());
    image.extend_from_slice(header.as_slice());
    image.extend_from_slice(&entries);
    Ok(image)
}

/// Writes the MP table for `num_cpus` vCPUs at `MPTABLE_START`.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let image = build_mptable(num_cpus)?;
    mem.write_slice(&image, GuestAddress(MPTABLE_START))
        .map_err(|source| MptableError::GuestMemoryWrite {
            addr: MPTABLE_START,
            size: image.len(),
            source,
        })
}

/// A processor as the MP table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpProcessor {
    /// Local APIC id.
    pub apic_id: u8,
    /// Usable.
    pub enabled: bool,
    /// Bootstrap processor.
    pub bsp: bool,
}

/// An I/O or local interrupt assignment as the MP table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpInterrupt {
    /// Interrupt type (0 INT, 1 NMI, 2 SMI, 3 ExtINT).
    pub int_type: u8,
    /// Source bus IRQ.
    pub src_bus_irq: u8,
    /// Destination IOAPIC id (I/O) or local APIC id, 0xff for all (local).
    pub dst_id: u8,
    /// Destination INTIN (I/O) or LINTIN (local) pin.
    pub dst_pin: u8,
}

/// What a parsed MP table says, for checks by tests and the VMM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MptableSummary {
    /// Processor entries in table order.
    pub processors: Vec<MpProcessor>,
    /// Bus entries: (bus id, bus type string).
    pub buses: Vec<(u8, [u8; 6])>,
    /// IOAPIC entries: (id, MMIO address).
    pub ioapics: Vec<(u8, u32)>,
    /// I/O interrupt entries.
    pub io_interrupts: Vec<MpInterrupt>,
    /// Local interrupt entries.
    pub local_interrupts: Vec<MpInterrupt>,
    /// Local APIC address from the header.
    pub lapic_addr: u32,
}

fn read_obj<T: ByteValued>(
    mem: &GuestMemoryMmap,
    addr: u64,
    what: &'static str,
) -> Result<T, MptableError> {
    mem.read_obj(GuestAddress(addr))
        .map_err(|source| MptableError::GuestMemoryRead { what, addr, source })
}

/// Reads and verifies (signatures, checksums, entry types) the MP table at
/// `MPTABLE_START`.
pub fn read_mptable(mem: &GuestMemoryMmap) -> Result<MptableSummary, MptableError> {
    let fp: MpFloatingPointer = read_obj(mem, MPTABLE_START, "floating pointer")?;
    if fp.signature != MPF_SIGNATURE {
        return Err(MptableError::BadSignature {
            what: "floating pointer",
            addr: MPTABLE_START,
            found: fp.signature,
        });
    }
    let sum = byte_sum(fp.as_slice());
    if sum != 0 {
        return Err(MptableError::BadChecksum {
            what: "floating pointer",
            addr: MPTABLE_START,
            sum,
        });
    }

    let config_addr = u64::from(fp.physptr);
    let header: MpConfigHeader = read_obj(mem, config_addr, "configuration table header")?;
    if header.signature != MPC_SIGNATURE {
        return Err(MptableError::BadSignature {
            what: "configuration table",
            addr: config_addr,
            found: header.signature,
        });
    }
    let mut table = vec![0u8; usize::from(header.base_table_length)];
    mem.read_slice(&mut table, GuestAddress(config_addr))
        .map_err(|source| MptableError::GuestMemoryRead {
            what: "configuration table",
            addr: config_addr,
            source,
        })?;
    let sum = byte_sum(&table);
    if sum != 0 {
        return Err(MptableError::BadChecksum {
            what: "configuration table",
            addr: config_addr,
            sum,
        });
    }

    let mut summary = MptableSummary {
        lapic_addr: header.lapic_addr,
        ..Default::default()
    };
    let mut addr = config_addr + HEADER_SIZE as u64;
    for _ in 0..header.entry_count {
        let entry_type: u8 = read_obj(mem, addr, "entry type")?;
        match entry_type {
            ENTRY_PROCESSOR => {
                let e: MpProcessorEntry = read_obj(mem, addr, "processor entry")?;
                summary.processors.push(MpProcessor {
                    apic_id: e.lapic_id,
                    enabled: e.cpu_flags & CPU_FLAG_ENABLED != 0,
                    bsp: e.cpu_flags & CPU_FLAG_BSP != 0,
                });
                addr += PROCESSOR_SIZE as u64;
                continue;
            }
            ENTRY_BUS => {
                let e: MpBusEntry = read_obj(mem, addr, "bus entry")?;
                summary.buses.push((e.bus_id, e.bus_type));
            }
            ENTRY_IOAPIC => {
                let e: MpIoapicEntry = read_obj(mem, addr, "IOAPIC entry")?;
                summary.ioapics.push((e.id, e.addr));
            }
            ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => {
                let e: MpInterruptEntry = read_obj(mem, addr, "interrupt entry")?;
                let interrupt = MpInterrupt {
                    int_type: e.int_type,
                    src_bus_irq: e.src_bus_irq,
                    dst_id: e.dst_id,
                    dst_pin: e.dst_pin,
                };
                if entry_type == ENTRY_IO_INTERRUPT {
                    summary.io_interrupts.push(interrupt);
                } else {
                    summary.local_interrupts.push(interrupt);
                }
            }
            entry_type => return Err(MptableError::UnknownEntryType { addr, entry_type }),
        }
        addr += SMALL_ENTRY_SIZE as u64;
    }
    Ok(summary)
}

/// Number of processor entries in the MP table at `MPTABLE_START`.
pub fn read_mptable_cpu_count(mem: &GuestMemoryMmap) -> Result<u8, MptableError> {
    let processors = read_mptable(mem)?.processors.len();
    u8::try_from(processors).map_err(|_| MptableError::TooManyCpus {
        num_cpus: processors as u32,
        max: MAX_SUPPORTED_CPUS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn check_table_for(num_cpus: u8) {
        let mem = guest_mem();
        setup_mptable(&mem, num_cpus).unwrap();

        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(byte_sum(&fp), 0, "floating pointer checksum");
        let physptr = u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]);
        assert_eq!(u64::from(physptr), EBDA_START + 16);

        let mut hdr = [0u8; HEADER_SIZE];
        mem.read_slice(&mut hdr, GuestAddress(physptr.into()))
            .unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        let length = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        assert_eq!(length + 16, mptable_size(num_cpus.into()));
        let mut table = vec![0u8; length];
        mem.read_slice(&mut table, GuestAddress(physptr.into()))
            .unwrap();
        assert_eq!(byte_sum(&table), 0, "configuration table checksum");
        let entry_count = u16::from_le_bytes([hdr[34], hdr[35]]);
        assert_eq!(
            usize::from(entry_count),
            usize::from(num_cpus) + 1 + 1 + 24 + 2
        );

        let summary = read_mptable(&mem).unwrap();
        assert_eq!(summary.processors.len(), usize::from(num_cpus));
        for (i, cpu) in summary.processors.iter().enumerate() {
            assert_eq!(usize::from(cpu.apic_id), i);
            assert!(cpu.enabled);
            assert_eq!(cpu.bsp, i == 0);
        }
        assert_eq!(summary.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(summary.ioapics, vec![(num_cpus, 0xFEC0_0000)]);
        assert_eq!(summary.lapic_addr, 0xFEE0_0000);
        assert_eq!(summary.io_interrupts.len(), 24);
        for (pin, irq) in summary.io_interrupts.iter().enumerate() {
            assert_eq!(
                *irq,
                MpInterrupt {
                    int_type: 0,
                    src_bus_irq: pin as u8,
                    dst_id: num_cpus,
                    dst_pin: pin as u8
                }
            );
        }
        assert_eq!(
            summary.local_interrupts,
            vec![
                MpInterrupt {
                    int_type: 3,
                    src_bus_irq: 0,
                    dst_id: 0xff,
                    dst_pin: 0
                },
                MpInterrupt {
                    int_type: 1,
                    src_bus_irq: 0,
                    dst_id: 0xff,
                    dst_pin: 1
                },
            ]
        );
        assert_eq!(read_mptable_cpu_count(&mem).unwrap(), num_cpus);
    }

    #[test]
    fn table_for_one_cpu_has_valid_checksums_and_one_bsp() {
        check_table_for(1);
    }

    #[test]
    fn table_for_two_cpus_has_valid_checksums_and_apic_ids() {
        check_table_for(2);
    }

    #[test]
    fn table_for_eight_cpus_has_valid_checksums_and_apic_ids() {
        check_table_for(8);
    }

    #[test]
    fn table_for_the_maximum_fits_its_region() {
        check_table_for(MAX_SUPPORTED_CPUS as u8);
        assert_eq!(mptable_size(254), 5364);
    }

    #[test]
    fn zero_and_too_many_cpus_are_rejected_with_the_count() {
        let mem = guest_mem();
        let err = setup_mptable(&mem, 0).unwrap_err();
        assert!(matches!(err, MptableError::ZeroCpus));
        assert!(err.to_string().contains("0 vCPUs"));
        let too_many = (MAX_SUPPORTED_CPUS + 1) as u8;
        let err = setup_mptable(&mem, too_many).unwrap_err();
        assert!(matches!(
            err,
            MptableError::TooManyCpus {
                num_cpus: 255,
                max: 254
            }
        ));
        assert_eq!(
            err.to_string(),
            "cannot build an MP table for 255 vCPUs, the maximum is 254"
        );
    }

    #[test]
    fn corrupted_table_is_reported_by_the_reader() {
        let mem = guest_mem();
        assert!(matches!(
            read_mptable(&mem),
            Err(MptableError::BadSignature { .. })
        ));
        setup_mptable(&mem, 2).unwrap();
        // Flip one byte of the first processor entry.
        let addr = GuestAddress(EBDA_START + 16 + HEADER_SIZE as u64 + 1);
        let byte: u8 = mem.read_obj(addr).unwrap();
        mem.write_obj(byte ^ 0x40, addr).unwrap();
        assert!(matches!(
            read_mptable(&mem),
            Err(MptableError::BadChecksum {
                what: "configuration table",
                ..
            })
        ));
    }
}
