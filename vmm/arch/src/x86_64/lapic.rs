//! Local APIC LINT0/LINT1 wiring of a vCPU.
//!
//! Without ACPI the guest learns from the MP table that LINT0 carries the
//! 8259 PIC's ExtINT and LINT1 the NMI (virtual wire mode); the in-kernel
//! LAPIC must be programmed the same way before the vCPU runs. Done by
//! editing the LVT registers in the 1 KiB register page KVM_GET_LAPIC
//! returns (pure helpers, unit tested) and handing it back with KVM_SET_LAPIC.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::regs::RegsError;

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the APIC register page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI (bits 10:8 = 100b).
pub const APIC_DELIVERY_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT (bits 10:8 = 111b).
pub const APIC_DELIVERY_MODE_EXTINT: u32 = 0x7;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u32 = 0x7 << DELIVERY_MODE_SHIFT;

/// Reads the 32-bit APIC register at `offset`.
pub fn get_lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit APIC register at `offset`.
pub fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, keeping the other LVT bits.
pub fn set_lint_delivery_modes(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [
        (APIC_LVT0, APIC_DELIVERY_MODE_EXTINT),
        (APIC_LVT1, APIC_DELIVERY_MODE_NMI),
    ] {
        let lvt = get_lapic_reg(lapic, offset);
        set_lapic_reg(
            lapic,
            offset,
            (lvt & !DELIVERY_MODE_MASK) | (mode << DELIVERY_MODE_SHIFT),
        );
    }
}

/// Programs LINT0 = ExtINT and LINT1 = NMI on `vcpu`'s in-kernel LAPIC
/// (the VM's irqchip must exist).
pub fn setup_lapic_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    set_lint_delivery_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint0_becomes_extint_and_lint1_nmi_keeping_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        // Masked (bit 16) with fixed delivery, as after reset.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0000);
        set_lint_delivery_modes(&mut lapic);
        assert_eq!(get_lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_lapic_reg(&lapic, APIC_LVT1), 0x0001_0400);
        // Little-endian byte order in the page.
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x07);
    }
}
