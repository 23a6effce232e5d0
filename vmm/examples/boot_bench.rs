//! `make bench` for the built-in VMM: boot timings and memory overhead.
//!
//! Prints medians over repeated runs of
//! - VM creation to the first vCPU entry, for a tiny payload and for the real
//!   guest kernel + initramfs (this includes loading both into memory);
//! - VM creation to guest init (boot timer), where the host's KVM can run the
//!   guest that far;
//! - the VMM's own memory overhead: process RSS minus the guest memory the
//!   guest touched, for an idle VM with 1 vCPU and 128 MiB, beside QEMU's
//!   microvm measured the same way in the same run.
//!
//! Usage: boot_bench KERNEL INITRD [RUNS]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use husk_vmm::host::probe_host_kvm;
use husk_vmm::{SerialSink, VmBuilder};

const IDLE_MEMORY_MIB: u64 = 128;
/// How long an idle VM settles before its memory is read.
const SETTLE: Duration = Duration::from_millis(500);
/// cli; hlt; jmp back: a vCPU that sleeps in KVM for good.
const IDLE_PAYLOAD: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
const PAYLOAD_ADDRESS: u64 = 0x10_0000;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Sum of `Rss:` (KiB) over the mappings of `pid` that satisfy `keep`.
fn smaps_rss_kib(pid: &str, keep: impl Fn(u64, u64) -> bool) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0;
    let mut current = (0, 0);
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                current = (start, end);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            if keep(current.0, current.1) {
                total += rest
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn vm_rss_kib(pid: &str) -> u64 {
    smaps_rss_kib(pid, |_, _| true)
}

fn first_entry_ms(builder: impl Fn() -> VmBuilder, runs: usize) -> f64 {
    let samples = (0..runs)
        .map(|_| {
            let mut vm = builder()
                .serial(SerialSink::Null)
                .build()
                .expect("bench VM builds");
            vm.start().expect("bench VM starts");
            while vm.boot_report().first_vcpu_entry.is_none() {
                std::thread::sleep(Duration::from_micros(200));
            }
            let entry = vm.boot_report().first_vcpu_entry.unwrap();
            vm.stop();
            entry.as_secs_f64() * 1e3
        })
        .collect();
    median(samples)
}

fn husk_idle_overhead_kib() -> (u64, u64, u64) {
    let mut vm = VmBuilder::new()
        .memory_mib(IDLE_MEMORY_MIB)
        .flat_image(IDLE_PAYLOAD.to_vec(), PAYLOAD_ADDRESS)
        .serial(SerialSink::Null)
        .build()
        .expect("idle VM builds");
    vm.start().expect("idle VM starts");
    std::thread::sleep(SETTLE);
    let ranges = vm.guest_memory_host_ranges();
    let guest = smaps_rss_kib("self", |start, end| {
        ranges
            .iter()
            .any(|&(s, len)| start < (s + len) as u64 && (s as u64) < end)
    });
    let total = vm_rss_kib("self");
    vm.stop();
    (total, guest, total - guest)
}

fn qemu_idle_overhead_kib() -> Option<(u64, u64, u64)> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "kvm",
            "-m",
            &IDLE_MEMORY_MIB.to_string(),
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-display",
            "none",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(SETTLE * 4);
    let pid = child.id().to_string();
    let guest_bytes = IDLE_MEMORY_MIB << 20;
    // QEMU's guest RAM is the one anonymous mapping of exactly that size.
    let guest = smaps_rss_kib(&pid, |start, end| end - start == guest_bytes);
    let total = vm_rss_kib(&pid);
    let _ = child.kill();
    let _ = child.wait();
    (total > 0).then_some((total, guest, total - guest))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (kernel, initrd) = match (args.get(1), args.get(2)) {
        (Some(k), Some(i)) => (PathBuf::from(k), PathBuf::from(i)),
        _ => {
            eprintln!("usage: boot_bench KERNEL INITRD [RUNS]");
            std::process::exit(2);
        }
    };
    let runs: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(20);
    let host = probe_host_kvm();
    println!(
        "built-in VMM on {} (accelerator: KVM), {runs} runs each, medians",
        host.describe()
    );

    let payload_entry = first_entry_ms(
        || {
            VmBuilder::new()
                .memory_mib(IDLE_MEMORY_MIB)
                .flat_image(IDLE_PAYLOAD.to_vec(), PAYLOAD_ADDRESS)
        },
        runs,
    );
    println!("  VM creation -> first vCPU entry, tiny payload, 1 vCPU, 128 MiB: {payload_entry:.2} ms (Firecracker's published API-to-start figure: ~12 ms)");
    let kernel_entry = first_entry_ms(
        || {
            VmBuilder::new().memory_mib(IDLE_MEMORY_MIB).linux(
                &kernel,
                Some(initrd.clone()),
                husk_vmm::DEFAULT_CMDLINE,
            )
        },
        runs,
    );
    println!(
        "  VM creation -> first vCPU entry, guest kernel + initramfs loaded: {kernel_entry:.2} ms"
    );

    if host.runs_stock_guests() {
        let samples = (0..runs)
            .map(|_| {
                let vm = VmBuilder::new()
                    .memory_mib(IDLE_MEMORY_MIB)
                    .linux(
                        &kernel,
                        Some(initrd.clone()),
                        "console=ttyS0 reboot=k panic=1 quiet husk.power_off_after_ms=0",
                    )
                    .serial(SerialSink::Null)
                    .build()
                    .expect("guest VM builds");
                let (_, report) = vm.run(Some(Duration::from_secs(30))).expect("guest runs");
                report
                    .init_reached
                    .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
            })
            .collect();
        println!(
            "  VM creation -> guest init (boot timer): {:.1} ms",
            median(samples)
        );
    } else {
        println!(
            "  VM creation -> guest init: not measurable here ({}); see the qemu/TCG figures",
            host.describe()
        );
    }

    let (total, guest, overhead) = husk_idle_overhead_kib();
    println!(
        "  idle VM memory, 1 vCPU, 128 MiB: husk process RSS {:.1} MiB, guest-touched {:.1} MiB, VMM overhead {:.2} MiB (Firecracker's published bar: <= 5 MiB)",
        total as f64 / 1024.0,
        guest as f64 / 1024.0,
        overhead as f64 / 1024.0
    );
    match qemu_idle_overhead_kib() {
        Some((q_total, q_guest, q_overhead)) => println!(
            "  peer, same run: qemu-system-x86_64 -M microvm -accel kvm, idle, 128 MiB: RSS {:.1} MiB, guest-touched {:.1} MiB, overhead {:.2} MiB; husk/qemu overhead ratio {:.2}",
            q_total as f64 / 1024.0,
            q_guest as f64 / 1024.0,
            q_overhead as f64 / 1024.0,
            overhead as f64 / q_overhead as f64
        ),
        None => println!("  peer qemu-system-x86_64 not measured: it could not be started (install qemu-system-x86: make deps)"),
    }
}
