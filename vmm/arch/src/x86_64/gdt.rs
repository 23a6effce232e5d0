//! The boot GDT and the KVM segment registers derived from it.
//!
//! The kernel replaces these descriptors almost immediately, but its entry
//! point expects flat segments already loaded: a 64-bit code segment for the
//! Linux 64-bit entry, a 32-bit one for the PVH entry, a flat data segment and
//! a busy TSS (VMX refuses to enter a guest whose TR is unusable). Built as
//! raw 8-byte descriptors (Intel SDM Vol. 3A, 3.4.5) so the same values are
//! written into guest memory at `BOOT_GDT_START` and decoded into the
//! `kvm_segment`s loaded into the hidden segment state.

use kvm_bindings::kvm_segment;

use super::regs::BootProtocol;

/// Descriptor index of the code segment (selector 0x08).
pub const GDT_CODE_INDEX: u16 = 1;
/// Descriptor index of the data segment (selector 0x10).
pub const GDT_DATA_INDEX: u16 = 2;
/// Descriptor index of the TSS (selector 0x18).
pub const GDT_TSS_INDEX: u16 = 3;
/// Number of descriptors in the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_ENTRIES: usize = 4;

/// Flags of a 64-bit code segment: G=1, L=1; present, DPL 0, execute/read, accessed.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flags of a 32-bit code segment: G=1, D=1; present, DPL 0, execute/read, accessed.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flags of a flat data segment: G=1, B=1; present, DPL 0, read/write, accessed.
pub const DATA_FLAGS: u16 = 0xc093;
/// Flags of a busy 32/64-bit TSS: present, system, type 0xb.
pub const TSS_FLAGS: u16 = 0x008b;
/// Limit of a flat segment in 4 KiB granules (4 GiB).
const FLAT_LIMIT: u32 = 0xfffff;
/// Limit of a minimal 32-bit TSS (104 bytes - 1).
const TSS_LIMIT: u32 = 0x67;

/// Encodes a segment descriptor. `flags` holds the access byte in bits 0–7
/// and the AVL/L/D/G nibble in bits 12–15, as they sit in descriptor bits
/// 40–47 and 52–55; `limit` is the 20-bit limit field.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT for `protocol`.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_ENTRIES] {
    let code_flags = match protocol {
        BootProtocol::LinuxBoot64 => CODE64_FLAGS,
        BootProtocol::Pvh => CODE32_FLAGS,
    };
    [
        0,
        gdt_entry(code_flags, 0, FLAT_LIMIT),
        gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT),
        gdt_entry(TSS_FLAGS, 0, TSS_LIMIT),
    ]
}

/// Decodes descriptor `entry`, found at `index` in the GDT, into the KVM
/// segment register state that loading its selector would produce.
pub fn segment_from_gdt_entry(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = bit(55) == 1;
    let present = bit(47);
    kvm_segment {
        base,
        // With G=1 the limit counts 4 KiB pages and the low 12 bits are all ones.
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code64_descriptor_has_the_textbook_encoding() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, 0x67), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn base_and_limit_are_split_across_the_descriptor() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        assert_eq!(e, 0x124a_9334_5678_bcde);
        let seg = segment_from_gdt_entry(e, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.selector, 0x28);
        assert_eq!((seg.g, seg.db, seg.l), (0, 1, 0));
    }

    #[test]
    fn long_mode_code_segment_decodes_to_l_set_and_4_gib_limit() {
        let gdt = boot_gdt(BootProtocol::LinuxBoot64);
        let cs = segment_from_gdt_entry(gdt[1], GDT_CODE_INDEX);
        assert_eq!(
            (cs.selector, cs.base, cs.limit, cs.type_),
            (0x08, 0, 0xffff_ffff, 0xb)
        );
        assert_eq!(
            (cs.present, cs.dpl, cs.s, cs.l, cs.db, cs.g, cs.unusable),
            (1, 0, 1, 1, 0, 1, 0)
        );
        let ds = segment_from_gdt_entry(gdt[2], GDT_DATA_INDEX);
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.l, ds.s),
            (0x10, 0x3, 1, 0, 1)
        );
        let tr = segment_from_gdt_entry(gdt[3], GDT_TSS_INDEX);
        assert_eq!(
            (tr.selector, tr.type_, tr.s, tr.limit, tr.present),
            (0x18, 0xb, 0, 0x67, 1)
        );
        let null = segment_from_gdt_entry(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn pvh_code_segment_is_32_bit() {
        let gdt = boot_gdt(BootProtocol::Pvh);
        let cs = segment_from_gdt_entry(gdt[1], GDT_CODE_INDEX);
        assert_eq!((cs.l, cs.db, cs.limit), (0, 1, 0xffff_ffff));
    }
}
