//! `make bench` for pre-booted templates in the built-in VMM: what N VMs
//! cost when each boots its own guest, against N VMs restored from one
//! snapshot, each in its own process as pods are.
//!
//! The guest is a payload, not Linux (a PVM host cannot run a stock guest
//! kernel under the built-in VMM): it writes one word in every page of
//! `TOUCHED_MIB` (the part of RAM a booted guest has filled: kernel, agent,
//! page cache), says "T", waits for the host's flag, reads every one of
//! those pages again and says "R", then halts. The template is taken at
//! "T". A fresh VM runs the whole program; a restored one only the read.
//!
//! Printed for each kind, as medians over the N processes: the process's
//! PSS, its guest RAM's PSS, and the rest (the VMM's own overhead); and
//! the time from `build()` to a VM ready to run. Figures only.
//!
//! Usage: template_bench [CLONES]   (children: template_bench child fresh|restore DIR)

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use husk_vmm::{MicroVm, SerialSink, SharedBuffer, VmBuilder};
use vm_memory::{Bytes, GuestAddress};

const MEMORY_MIB: u64 = 128;
const TOUCHED_MIB: u32 = 64;
const TOUCHED_START: u32 = 16 << 20;
const PAYLOAD_ADDRESS: u64 = 0x10_0000;
const FLAG: u32 = 0x30_0000;
const DEADLINE: Duration = Duration::from_secs(120);
/// How long an idle VM settles before its memory is read.
const SETTLE: Duration = Duration::from_millis(500);

/// The payload, hand-assembled 32-bit code (see the module comment).
fn payload() -> Vec<u8> {
    let end = TOUCHED_START + (TOUCHED_MIB << 20);
    let mut code = Vec::new();
    let page_loop = |code: &mut Vec<u8>, access: [u8; 2]| {
        code.push(0xbf); // mov edi, TOUCHED_START
        code.extend_from_slice(&TOUCHED_START.to_le_bytes());
        code.extend_from_slice(&access); // mov [edi], edi | mov eax, [edi]
        code.extend_from_slice(&[0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add edi, 4096
        code.extend_from_slice(&[0x81, 0xff]); // cmp edi, end
        code.extend_from_slice(&end.to_le_bytes());
        code.extend_from_slice(&[0x72, 0xf0]); // jb back over 16 bytes
    };
    let say = |code: &mut Vec<u8>, byte: u8| {
        code.push(0xba); // mov edx, COM1
        code.extend_from_slice(&0x3f8u32.to_le_bytes());
        code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
    };
    page_loop(&mut code, [0x89, 0x3f]);
    say(&mut code, b'T');
    code.extend_from_slice(&[0x66, 0x83, 0x3d]); // cmp word [FLAG], 1
    code.extend_from_slice(&FLAG.to_le_bytes());
    code.extend_from_slice(&[0x01, 0x75, 0xf6]); // jne back to the cmp
    page_loop(&mut code, [0x8b, 0x07]);
    say(&mut code, b'R');
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back
    code
}

fn wait_for_console(console: &SharedBuffer, expected: &[u8]) {
    let started = Instant::now();
    while !console.0.lock().unwrap().ends_with(expected) {
        assert!(
            started.elapsed() < DEADLINE,
            "the payload never said {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn fresh_vm(console: &SharedBuffer) -> MicroVm {
    VmBuilder::new()
        .memory_mib(MEMORY_MIB)
        .flat_image(payload(), PAYLOAD_ADDRESS)
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("the payload VM builds")
}

/// A child: one VM, fresh or restored, run to "R"; then it reports its
/// guest RAM's host ranges and build time and idles until stdin closes.
fn child(mode: &str, directory: &Path) {
    let console = SharedBuffer::default();
    let started = Instant::now();
    let mut vm = match mode {
        "fresh" => fresh_vm(&console),
        _ => VmBuilder::new()
            .restore_snapshot(directory)
            .serial(SerialSink::Writer(Box::new(console.clone())))
            .build()
            .expect("the snapshot restores"),
    };
    let build_ms = started.elapsed().as_secs_f64() * 1e3;
    vm.memory()
        .write_obj(1u32, GuestAddress(u64::from(FLAG)))
        .unwrap();
    vm.start().expect("the VM starts");
    wait_for_console(&console, b"R");
    let ranges: Vec<String> = vm
        .guest_memory_host_ranges()
        .iter()
        .map(|(start, len)| format!("{start:x}:{len:x}"))
        .collect();
    println!("ready {build_ms:.3} {}", ranges.join(","));
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    vm.stop();
}

/// `Pss:` (KiB) of `pid`: in total, and of the mappings inside `ranges`.
fn pss_kib(pid: u32, ranges: &[(u64, u64)]) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                in_guest = ranges.iter().any(|&(s, len)| start < s + len && s < end);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Pss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (total, guest)
}

struct Running {
    child: Child,
    build_ms: f64,
    ranges: Vec<(u64, u64)>,
}

fn spawn(mode: &str, directory: &Path) -> Running {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child", mode])
        .arg(directory)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("a bench child starts");
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let mut fields = line.split_whitespace();
    assert_eq!(
        fields.next(),
        Some("ready"),
        "a {mode} child failed: {line:?}"
    );
    let build_ms: f64 = fields.next().unwrap().parse().unwrap();
    let ranges = fields
        .next()
        .unwrap()
        .split(',')
        .map(|range| {
            let (start, len) = range.split_once(':').unwrap();
            (
                u64::from_str_radix(start, 16).unwrap(),
                u64::from_str_radix(len, 16).unwrap(),
            )
        })
        .collect();
    Running {
        child,
        build_ms,
        ranges,
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// N children of one kind at once; medians of PSS (total, guest RAM,
/// the rest) in MiB and of the build time in ms.
fn measure(mode: &str, directory: &Path, clones: usize) -> (f64, f64, f64, f64) {
    let mut running: Vec<Running> = (0..clones).map(|_| spawn(mode, directory)).collect();
    std::thread::sleep(SETTLE);
    let samples: Vec<(u64, u64)> = running
        .iter()
        .map(|r| pss_kib(r.child.id(), &r.ranges))
        .collect();
    let build = median(running.iter().map(|r| r.build_ms).collect());
    for r in &mut running {
        drop(r.child.stdin.take());
        let _ = r.child.wait();
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    (
        median(samples.iter().map(|s| mib(s.0)).collect()),
        median(samples.iter().map(|s| mib(s.1)).collect()),
        median(samples.iter().map(|s| mib(s.0 - s.1)).collect()),
        build,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2], Path::new(&args[3]));
        return;
    }
    let clones: usize = args.get(1).map_or(10, |n| n.parse().expect("CLONES"));
    let work = tempfile::tempdir().expect("a work directory");
    let template: PathBuf = work.path().join("template");

    let console = SharedBuffer::default();
    let mut vm = fresh_vm(&console);
    vm.start().expect("the template VM starts");
    wait_for_console(&console, b"T");
    vm.pause().expect("the template VM pauses");
    let saving = Instant::now();
    let summary = vm.snapshot(&template).expect("the snapshot is saved");
    let save_ms = saving.elapsed().as_secs_f64() * 1e3;
    vm.stop();

    println!(
        "  {clones} VMs, 1 vCPU and {MEMORY_MIB} MiB each, one process each; the guest wrote {TOUCHED_MIB} MiB before the snapshot and reads it all after"
    );
    println!(
        "  snapshot: {:.1} MiB of guest RAM written of {:.0} MiB, in {save_ms:.1} ms",
        summary.memory_written_bytes as f64 / (1 << 20) as f64,
        summary.memory_bytes as f64 / (1 << 20) as f64
    );
    let (fresh_total, fresh_guest, fresh_rest, fresh_build) = measure("fresh", &template, clones);
    let (clone_total, clone_guest, clone_rest, clone_build) = measure("restore", &template, clones);
    println!(
        "  booted each:        PSS {fresh_total:.1} MiB per VM (guest RAM {fresh_guest:.1}, VMM {fresh_rest:.2}); build {fresh_build:.2} ms"
    );
    println!(
        "  restored from it:   PSS {clone_total:.1} MiB per VM (guest RAM {clone_guest:.1}, VMM {clone_rest:.2}); restore {clone_build:.2} ms"
    );
    println!(
        "  restored/booted PSS ratio {:.2}; VMM overhead excluding guest RAM {clone_rest:.2} MiB (goal <= 15 MiB)",
        clone_total / fresh_total
    );
}
