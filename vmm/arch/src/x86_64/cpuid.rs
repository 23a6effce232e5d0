//! Per-vCPU CPUID, derived from what KVM supports.
//!
//! KVM_GET_SUPPORTED_CPUID describes the host; each vCPU must instead see
//! the VM's topology and identity: its own APIC id, one package of
//! `num_vcpus` cores with one thread each, the hypervisor bit, and no
//! performance-monitoring or power-management features we do not emulate.
//! The edits are a pure function over the `kvm_cpuid_entry2` list, so they
//! are unit tested with hand-made tables; KVM's paravirtual leaves
//! (0x4000_0000..) pass through untouched.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use thiserror::Error;

/// Leaf 0x1: version and feature information.
pub const LEAF_FEATURES: u32 = 0x1;
/// Leaf 0x4: deterministic cache parameters (Intel).
pub const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 0x6: thermal and power management.
pub const LEAF_THERMAL_POWER: u32 = 0x6;
/// Leaf 0xA: architectural performance monitoring.
pub const LEAF_PERFMON: u32 = 0xa;
/// Leaf 0xB: extended topology enumeration.
pub const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1F: V2 extended topology enumeration.
pub const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 0x8000_0008: address sizes and (AMD) core count.
pub const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// Leaf 0x8000_001E: AMD extended APIC id, core and node ids.
pub const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 0x1 ECX bit 31: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX bit 28: EBX[23:16] (logical processor count) is valid.
pub const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x1 ECX bit 24: TSC-deadline mode of the local APIC timer.
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x6 EAX bit 2: APIC timer always running (ARAT), the one leaf-6
/// feature KVM emulates; thermal sensors, turbo and HWP are not.
pub const EAX_ARAT: u32 = 1 << 2;
/// Level types of leaves 0xB/0x1F, ECX[15:8].
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// Leaf 0x4 EAX[31:26] holds "cores per package - 1" in 6 bits.
const LEAF4_MAX_CORES: u32 = 64;

/// Errors while normalising CPUID.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuidError {
    /// A VM needs at least one vCPU.
    #[error("cannot build CPUID for a VM of 0 vCPUs")]
    ZeroVcpus,
    /// The vCPU index is outside the VM.
    #[error("vCPU index {vcpu_index} is out of range for a VM of {num_vcpus} vCPUs")]
    VcpuIndexOutOfRange {
        /// The index asked for.
        vcpu_index: u8,
        /// The VM's vCPU count.
        num_vcpus: u8,
    },
    /// A leaf every x86-64 CPU has is missing.
    #[error("CPUID leaf {leaf:#x} is missing from the supported CPUID")]
    MissingLeaf {
        /// The leaf.
        leaf: u32,
    },
    /// Adding a topology subleaf overflowed the CPUID table.
    #[error("cannot add CPUID leaf {leaf:#x} subleaf {subleaf}: the table is full")]
    TableFull {
        /// The leaf.
        leaf: u32,
        /// The subleaf.
        subleaf: u32,
    },
}

/// Number of bits needed to hold ids 0..count (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Shapes `cpuid` (as returned by KVM_GET_SUPPORTED_CPUID) for vCPU
/// `vcpu_index` of a VM with `num_vcpus` vCPUs.
pub fn normalize_cpuid(cpuid: &mut CpuId, vcpu_index: u8, num_vcpus: u8) -> Result<(), CpuidError> {
    if num_vcpus == 0 {
        return Err(CpuidError::ZeroVcpus);
    }
    if vcpu_index >= num_vcpus {
        return Err(CpuidError::VcpuIndexOutOfRange {
            vcpu_index,
            num_vcpus,
        });
    }
    if !cpuid.as_slice().iter().any(|e| e.function == LEAF_FEATURES) {
        return Err(CpuidError::MissingLeaf {
            leaf: LEAF_FEATURES,
        });
    }
    // Topology leaves need their SMT and core subleaves even when KVM lists
    // fewer; only add them to leaves KVM reports at all.
    for leaf in [LEAF_EXT_TOPOLOGY, LEAF_EXT_TOPOLOGY_V2] {
        if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
            continue;
        }
        for subleaf in 0..2 {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == leaf && e.index == subleaf);
            if !present {
                cpuid
                    .push(kvm_cpuid_entry2 {
                        function: leaf,
                        index: subleaf,
                        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                        ..Default::default()
                    })
                    .map_err(|_| CpuidError::TableFull { leaf, subleaf })?;
            }
        }
    }
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, u32::from(vcpu_index), u32::from(num_vcpus));
    }
    Ok(())
}

/// Advertises (or hides) the LAPIC TSC-deadline timer in leaf 0x1.
/// KVM_GET_SUPPORTED_CPUID never reports it because it depends on the
/// in-kernel LAPIC; set it when `KVM_CAP_TSC_DEADLINE_TIMER` is present.
pub fn set_tsc_deadline_timer(cpuid: &mut CpuId, enabled: bool) {
    for entry in cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(|e| e.function == LEAF_FEATURES)
    {
        if enabled {
            entry.ecx |= ECX_TSC_DEADLINE;
        } else {
            entry.ecx &= !ECX_TSC_DEADLINE;
        }
    }
}

/// Applies the per-leaf edits to one entry; `vcpu` < `count`.
fn normalize_entry(entry: &mut kvm_cpuid_entry2, vcpu: u32, count: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per
            // package; CLFLUSH size and brand index (EBX[15:0]) stay.
            entry.ebx = (entry.ebx & 0xffff) | (vcpu << 24) | ((count & 0xff) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            let cache_type = entry.eax & 0x1f;
            if cache_type != 0 {
                let cores = count.next_power_of_two().min(LEAF4_MAX_CORES);
                let level = (entry.eax >> 5) & 0x7;
                // One thread per core: L1/L2 are private, L3 is shared by all.
                let sharing = if level >= 3 { cores } else { 1 };
                entry.eax =
                    (entry.eax & 0x3fff) | ((cores - 1) << 26) | (((sharing - 1) & 0xfff) << 14);
            }
        }
        LEAF_THERMAL_POWER => {
            entry.eax &= EAX_ARAT;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_PERFMON => {
            // Version 0: no architectural PMU, so the guest does not program
            // counters we do not expose.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            let subleaf = entry.index;
            entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
            let (shift, processors, level_type) = match subleaf {
                // SMT level: one thread per core, so no bits for the thread id.
                0 => (0, 1, LEVEL_TYPE_SMT),
                // Core level: every vCPU of the package.
                1 => (id_bits(count), count, LEVEL_TYPE_CORE),
                _ => (0, 0, LEVEL_TYPE_INVALID),
            };
            entry.eax = shift;
            entry.ebx = processors;
            entry.ecx = (level_type << 8) | (subleaf & 0xff);
            entry.edx = vcpu;
        }
        LEAF_AMD_SIZES => {
            // ECX[15:12] APIC id bits for cores, ECX[7:0] cores - 1.
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | ((count - 1) & 0xff);
        }
        LEAF_AMD_EXT_APIC_ID => {
            entry.eax = vcpu;
            // EBX[15:8] threads per core - 1 = 0, EBX[7:0] core id.
            entry.ebx = vcpu & 0xff;
            // One node per package (nodes per processor - 1 = 0, node id 0).
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A table shaped like KVM's on an Intel host.
    fn host_like_cpuid() -> CpuId {
        CpuId::from_entries(&[
            entry(0x0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            // CLFLUSH 8 (x8 bytes) in EBX[15:8], APIC id 7 from the host.
            entry(0x1, 0, 0x906ea, 0x0710_0800, 0x7ffa_3203, 0x178b_fbff),
            entry(0x4, 0, 0x1c00_4121, 0, 0, 0),
            entry(0x4, 1, 0x1c00_4122, 0, 0, 0),
            entry(0x4, 2, 0x1c00_4143, 0, 0, 0),
            entry(0x4, 3, 0x1c03_c163, 0, 0, 0),
            entry(0x4, 4, 0, 0, 0, 0),
            entry(0x6, 0, 0x77, 0x2, 0x9, 0),
            entry(0xa, 0, 0x0760_3504, 0, 0, 0x8603),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x8000_0008, 0, 0x3027, 0, 0x7007, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_in_leaf_1_and_0xb() {
        for vcpu in 0..4u8 {
            let mut cpuid = host_like_cpuid();
            normalize_cpuid(&mut cpuid, vcpu, 4).unwrap();
            let leaf1 = find(&cpuid, 0x1, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(vcpu));
            assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
            assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(leaf1.edx & EDX_HTT, 0);
            for subleaf in 0..2 {
                assert_eq!(find(&cpuid, 0xb, subleaf).edx, u32::from(vcpu));
            }
        }
    }

    #[test]
    fn single_vcpu_clears_htt_and_sets_hypervisor_bit() {
        let mut cpuid = host_like_cpuid();
        normalize_cpuid(&mut cpuid, 0, 1).unwrap();
        let leaf1 = find(&cpuid, 0x1, 0);
        assert_eq!(leaf1.edx & EDX_HTT, 0);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 1);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
    }

    #[test]
    fn topology_leaf_describes_one_thread_per_core_and_all_cores() {
        let mut cpuid = host_like_cpuid();
        normalize_cpuid(&mut cpuid, 2, 6).unwrap();
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        // Subleaf 1 was missing from the host table and is added.
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 2));
        assert_eq!(core.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 1);
        // Leaf 0x1F is absent on this host and stays absent.
        assert!(!cpuid.as_slice().iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn cache_leaf_reports_package_cores_and_l3_sharing() {
        let mut cpuid = host_like_cpuid();
        normalize_cpuid(&mut cpuid, 0, 3).unwrap();
        let l1d = find(&cpuid, 0x4, 0);
        assert_eq!(l1d.eax >> 26, 3, "4 addressable cores - 1");
        assert_eq!((l1d.eax >> 14) & 0xfff, 0, "L1 private to one thread");
        assert_eq!(l1d.eax & 0x3fff, 0x0121, "cache type and level kept");
        let l3 = find(&cpuid, 0x4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(find(&cpuid, 0x4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn pmu_and_power_features_are_hidden_and_kvm_leaves_kept() {
        let mut cpuid = host_like_cpuid();
        normalize_cpuid(&mut cpuid, 0, 2).unwrap();
        let pmu = find(&cpuid, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let power = find(&cpuid, 0x6, 0);
        assert_eq!(
            (power.eax, power.ebx, power.ecx, power.edx),
            (EAX_ARAT, 0, 0, 0)
        );
        let kvm = find(&cpuid, 0x4000_0000, 0);
        assert_eq!(
            (kvm.ebx, kvm.ecx, kvm.edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d)
        );
        let sizes = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(sizes.ecx, 0x1001);
    }

    #[test]
    fn tsc_deadline_bit_follows_the_capability() {
        let mut cpuid = host_like_cpuid();
        set_tsc_deadline_timer(&mut cpuid, false);
        assert_eq!(find(&cpuid, 0x1, 0).ecx & ECX_TSC_DEADLINE, 0);
        set_tsc_deadline_timer(&mut cpuid, true);
        assert_ne!(find(&cpuid, 0x1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn bad_counts_and_missing_leaf_1_are_errors() {
        let mut cpuid = host_like_cpuid();
        assert_eq!(
            normalize_cpuid(&mut cpuid, 0, 0),
            Err(CpuidError::ZeroVcpus)
        );
        let err = normalize_cpuid(&mut cpuid, 4, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vCPU index 4 is out of range for a VM of 4 vCPUs"
        );
        let mut empty = CpuId::from_entries(&[entry(0x0, 0, 0xd, 0, 0, 0)]).unwrap();
        assert_eq!(
            normalize_cpuid(&mut empty, 0, 1),
            Err(CpuidError::MissingLeaf { leaf: 0x1 })
        );
    }
}
