//! Boots the real husk guest kernel and initramfs in the built-in VMM with 1
//! and 2 vCPUs.
//!
//! Full form (hardware-assisted KVM): the agent's readiness marker appears,
//! the boot timer records init, and the guest powers off cleanly.
//! Early-boot form (PVM hosts, see `docs/architecture.md`): a stock
//! kernel stops after its early boot there, so the test asserts from the
//! kernel's own console that our boot protocol was honoured: the kernel
//! version line, the exact command line we passed, the E820 map the VMM
//! built, and the MP table with the right processor count.
//! Each run prints which form it ran and why.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_vmm::host::{probe_host_kvm, HostKvm};
use husk_vmm::{SerialSink, SharedBuffer, VmBuilder, VmExit};

/// Bound on a full boot to power-off (hardware KVM boots in well under 1 s).
const FULL_BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on the early-boot phase under PVM's emulator (about 10 s here).
const EARLY_BOOT_DEADLINE: Duration = Duration::from_secs(180);

fn artifact(env: &str, name: &str) -> PathBuf {
    let path = std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../build")
            .join(name)
    });
    assert!(
        path.exists(),
        "the guest artifact {} is missing: run `make kernel initrd` first",
        path.display()
    );
    path
}

fn e820_line(entry: &husk_arch::E820Entry) -> String {
    let kind = match entry.kind {
        husk_arch::E820Kind::Ram => "usable",
        husk_arch::E820Kind::Reserved => "reserved",
    };
    format!(
        "BIOS-e820: [mem {:#018x}-{:#018x}] {kind}",
        entry.addr,
        entry.addr + entry.size - 1
    )
}

fn boot(vcpus: u32) {
    let host = probe_host_kvm();
    let kernel = artifact("HUSK_KERNEL", "vmlinux");
    let initrd = artifact("HUSK_INITRD", "initramfs.cpio.gz");
    match &host {
        HostKvm::Unavailable { reason } => {
            println!("husk-test-form: linux boot {vcpus} vCPU: NOT RUN, no usable KVM ({reason})");
        }
        HostKvm::Hardware => full_boot(vcpus, &kernel, &initrd),
        HostKvm::Pvm => early_boot(vcpus, &kernel, &initrd, &host),
    }
}

fn full_boot(vcpus: u32, kernel: &Path, initrd: &Path) {
    let console = SharedBuffer::default();
    let cmdline = "console=ttyS0 reboot=k panic=1 husk.power_off_after_ms=0";
    let vm = VmBuilder::new()
        .vcpus(vcpus)
        .memory_mib(256)
        .linux(kernel, Some(initrd.to_owned()), cmdline)
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("the guest VM builds");
    let (exit, report) = vm.run(Some(FULL_BOOT_DEADLINE)).expect("the guest runs");
    let output = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    assert!(
        output.contains("HUSK_AGENT_READY") && output.contains(&format!("cpus={vcpus}")),
        "no readiness marker with cpus={vcpus} in the console:\n{output}"
    );
    assert_eq!(
        exit,
        VmExit::Reset,
        "the agent's power-off ends the VM cleanly"
    );
    assert!(report.init_reached.is_some(), "the boot timer saw init");
    println!(
        "husk-test-form: linux boot {vcpus} vCPU: full boot to the agent (hardware KVM), init after {:?}",
        report.init_reached.unwrap()
    );
}

fn early_boot(vcpus: u32, kernel: &Path, initrd: &Path, host: &HostKvm) {
    let console = SharedBuffer::default();
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 husk.power_off_after_ms=0";
    let mut vm = VmBuilder::new()
        .vcpus(vcpus)
        .memory_mib(128)
        .linux(kernel, Some(initrd.to_owned()), cmdline)
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("the guest VM builds");
    let expected_e820: Vec<String> = husk_arch::build_e820_map(vm.memory())
        .iter()
        .map(e820_line)
        .collect();
    let guest_cmdline = vm
        .guest_cmdline()
        .expect("a Linux boot has a command line")
        .to_owned();
    vm.start().expect("the vCPUs start");
    // The kernel prints "Kernel command line:" after parsing the MP table;
    // stop as soon as it appears, or when the guest ends by itself.
    let started = Instant::now();
    let mut ended_by_itself = None;
    while started.elapsed() < EARLY_BOOT_DEADLINE {
        if let Some(exit) = vm.wait(Some(Duration::from_millis(200))).unwrap() {
            ended_by_itself = Some(exit);
            break;
        }
        if String::from_utf8_lossy(&console.0.lock().unwrap()).contains("Kernel command line:") {
            break;
        }
    }
    let stopped = vm.stop();
    // The kernel's serial console ends lines with CR LF.
    let output = String::from_utf8_lossy(&console.0.lock().unwrap()).replace('\r', "");
    let expect = |needle: &str| {
        assert!(
            output.contains(needle),
            "the guest console lacks '{needle}':\n{output}"
        );
    };
    expect("Linux version 6.12");
    expect(&format!("Command line: {guest_cmdline}"));
    for line in &expected_e820 {
        expect(line);
    }
    expect("Intel MultiProcessor Specification v1.4");
    expect("Processor #0 (Bootup-CPU)");
    for cpu in 1..vcpus {
        expect(&format!("Processor #{cpu}\n"));
    }
    expect(&format!("Processors: {vcpus}\n"));
    expect("RAMDISK: [mem ");
    println!(
        "husk-test-form: linux boot {vcpus} vCPU: early-boot protocol check ({}; the agent cannot be reached here), \
         checked kernel version, command line, {} E820 entries and {vcpus} MP-table processors; VM ended: {}",
        host.describe(),
        expected_e820.len(),
        ended_by_itself.unwrap_or(stopped)
    );
}

#[test]
fn linux_boots_with_one_vcpu() {
    boot(1);
}

#[test]
fn linux_boots_with_two_vcpus() {
    boot(2);
}
