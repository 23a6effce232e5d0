//! KVM tests of the vCPU boot state: real vCPUs are put into long mode and
//! PVH protected mode by `husk-arch` and run a few bytes of guest code that
//! only behaves as checked in the expected mode. Each test prints
//! "kvm test not run: <why>" and returns when `/dev/kvm` cannot be used.

#![cfg(target_arch = "x86_64")]

use husk_arch::*;
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const MEM_SIZE: u64 = 64 << 20;
const ENTRY: u64 = HIMEM_START;

/// A VM with `MEM_SIZE` of guest memory and the in-kernel irqchip, or why not.
fn vm_with_memory(test: &str) -> Option<(Kvm, VmFd, GuestMemoryMmap)> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            println!("kvm test not run: {test}: cannot open /dev/kvm: {e}");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mem = GuestMemoryMmap::from_ranges(&guest_memory_regions(MEM_SIZE).unwrap()).unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping stays alive as long as `mem`, which outlives the VM
        // in every test (both are dropped at the end of the test function).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    }
    Some((kvm, vm, mem))
}

fn vcpu_with_cpuid(kvm: &Kvm, vm: &VmFd, index: u8, count: u8) -> VcpuFd {
    let vcpu = vm.create_vcpu(index.into()).expect("KVM_CREATE_VCPU");
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    normalize_cpuid(&mut cpuid, index, count).unwrap();
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    vcpu
}

/// Runs until the first port write and returns (port, first byte).
fn run_to_port_write(vcpu: &mut VcpuFd) -> (u16, u8) {
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => return (port, data[0]),
            VcpuExit::IoIn(_, data) => data.fill(0),
            other => panic!("unexpected exit before the port write: {other:?}"),
        }
    }
}

#[test]
fn long_mode_boot_state_runs_64_bit_code_with_zero_page_in_rsi() {
    let Some((kvm, vm, mem)) = vm_with_memory("long mode boot") else {
        return;
    };
    let mut vcpu = vcpu_with_cpuid(&kvm, &vm, 0, 1);
    // mov rax, 0x1122334455667788 (needs 64-bit mode: REX.W imm64)
    // mov dx, 0x3f8; out dx, al; hlt
    let code = [
        0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, //
        0x66, 0xba, 0xf8, 0x03, //
        0xee, //
        0xf4,
    ];
    mem.write_slice(&code, GuestAddress(ENTRY)).unwrap();
    setup_boot_vcpu_state(
        &vcpu,
        &mem,
        BootProtocol::LinuxBoot64,
        GuestAddress(ENTRY),
        GuestAddress(ZERO_PAGE_START),
    )
    .unwrap();

    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(
        sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
        X86_CR0_PE | X86_CR0_PG
    );
    assert_eq!(sregs.cr3, PML4_START);
    assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
    assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 0x08));
    let regs = vcpu.get_regs().unwrap();
    assert_eq!(
        (regs.rip, regs.rsi, regs.rsp),
        (ENTRY, ZERO_PAGE_START, BOOT_STACK_POINTER)
    );

    assert_eq!(run_to_port_write(&mut vcpu), (0x3f8, 0x88));
    let regs = vcpu.get_regs().unwrap();
    assert_eq!(regs.rax, 0x1122_3344_5566_7788, "the CPU ran 64-bit code");
    assert_eq!(regs.rsi, ZERO_PAGE_START);
}

#[test]
fn pvh_boot_state_runs_32_bit_code_with_start_info_in_ebx() {
    let Some((kvm, vm, mem)) = vm_with_memory("PVH boot") else {
        return;
    };
    let mut vcpu = vcpu_with_cpuid(&kvm, &vm, 0, 1);
    // In 32-bit mode 0xb8 is `mov eax, imm32`; in 64-bit mode 0x48 would be a
    // REX prefix. Then mov dx, 0x3f8; out dx, al; hlt.
    let code = [
        0xb8, 0x78, 0x56, 0x34, 0x12, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4,
    ];
    mem.write_slice(&code, GuestAddress(ENTRY)).unwrap();
    setup_boot_vcpu_state(
        &vcpu,
        &mem,
        BootProtocol::Pvh,
        GuestAddress(ENTRY),
        GuestAddress(PVH_INFO_START),
    )
    .unwrap();

    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
    assert_eq!(sregs.efer & EFER_LMA, 0);
    assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));

    assert_eq!(run_to_port_write(&mut vcpu), (0x3f8, 0x78));
    let regs = vcpu.get_regs().unwrap();
    assert_eq!(regs.rax as u32, 0x1234_5678);
    assert_eq!(regs.rbx, PVH_INFO_START);
}

#[test]
fn lapic_lint_pins_read_back_as_extint_and_nmi() {
    let Some((kvm, vm, _mem)) = vm_with_memory("LAPIC LINT") else {
        return;
    };
    let vcpu = vcpu_with_cpuid(&kvm, &vm, 0, 1);
    setup_lapic_lint(&vcpu).unwrap();
    let lapic = vcpu.get_lapic().unwrap();
    assert_eq!(
        (get_lapic_reg(&lapic, APIC_LVT0) >> 8) & 0x7,
        APIC_DELIVERY_MODE_EXTINT
    );
    assert_eq!(
        (get_lapic_reg(&lapic, APIC_LVT1) >> 8) & 0x7,
        APIC_DELIVERY_MODE_NMI
    );
}

#[test]
fn ap_state_sets_boot_msrs_and_each_vcpu_gets_its_apic_id() {
    let Some((kvm, vm, _mem)) = vm_with_memory("AP state") else {
        return;
    };
    let _bsp = vcpu_with_cpuid(&kvm, &vm, 0, 2);
    let ap = vcpu_with_cpuid(&kvm, &vm, 1, 2);
    setup_ap_vcpu_state(&ap).unwrap();

    let mut msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            ..Default::default()
        },
    ])
    .unwrap();
    assert_eq!(ap.get_msrs(&mut msrs).unwrap(), 2);
    let values: Vec<(u32, u64)> = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
    assert_ne!(values[0].1 & MISC_ENABLE_FAST_STRING, 0, "{values:x?}");
    assert_eq!(values[1].1, MTRR_ENABLE | MTRR_MEM_TYPE_WB, "{values:x?}");

    let cpuid = ap.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let leaf1 = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .expect("leaf 1");
    assert_eq!(leaf1.ebx >> 24, 1, "initial APIC id of vCPU 1");
    assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
}
