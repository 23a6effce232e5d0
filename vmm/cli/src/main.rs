//! `husk-vmm`: a small debug front end over the husk VMM library. It boots a
//! kernel (and initrd) in a KVM microVM with the console on stdout or a file
//! and exits with a status that says how the guest ended:
//! 0 clean power-off (i8042 reset), 1 bad input or setup failure,
//! 2 triple fault, 3 KVM internal error, 4 failed entry, 5 system event,
//! 6 KVM_RUN failure, 124 timeout.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use husk_vmm::{BootProtocolChoice, SerialSink, VmBuilder, DEFAULT_CMDLINE};

#[derive(Parser, Debug)]
#[command(
    name = "husk-vmm",
    version,
    about = "Boot a kernel in a husk KVM microVM (debug tool)"
)]
struct Args {
    /// Guest kernel: ELF vmlinux (64-bit or PVH entry) or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line; virtio-mmio devices are appended to it.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long = "memory-mib", default_value_t = 128)]
    memory_mib: u64,
    /// Entry protocol: auto (PVH when the kernel offers it), linux64, pvh.
    #[arg(long, default_value = "auto", value_parser = parse_protocol)]
    boot_protocol: BootProtocolChoice,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
}

fn parse_protocol(value: &str) -> Result<BootProtocolChoice, String> {
    match value {
        "auto" => Ok(BootProtocolChoice::Auto),
        "linux64" => Ok(BootProtocolChoice::Linux64),
        "pvh" => Ok(BootProtocolChoice::Pvh),
        other => Err(format!(
            "unknown boot protocol '{other}' (expected auto, linux64 or pvh)"
        )),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| "husk_vmm=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    std::process::exit(run(args));
}

fn run(args: Args) -> i32 {
    let serial = match &args.console_log {
        Some(path) => match std::fs::File::create(path) {
            Ok(file) => SerialSink::Writer(Box::new(file)),
            Err(error) => {
                eprintln!(
                    "husk-vmm: cannot create the console log {}: {error}",
                    path.display()
                );
                return 1;
            }
        },
        None => SerialSink::Stdout,
    };
    let builder = VmBuilder::new()
        .linux(&args.kernel, args.initrd.clone(), args.cmdline.clone())
        .boot_protocol(args.boot_protocol)
        .vcpus(args.vcpus)
        .memory_mib(args.memory_mib)
        .serial(serial)
        .kvm_path(&args.kvm);
    let vm = match builder.build() {
        Ok(vm) => vm,
        Err(error) => {
            eprintln!("husk-vmm: {error}");
            return 1;
        }
    };
    match vm.run(args.timeout_secs.map(Duration::from_secs)) {
        Ok((reason, report)) => {
            let ms = |d: Option<Duration>| {
                d.map_or("not reached".to_owned(), |d| {
                    format!("{:.1} ms", d.as_secs_f64() * 1e3)
                })
            };
            eprintln!(
                "husk-vmm: {reason}; first vCPU entry {}, guest init {}",
                ms(report.first_vcpu_entry),
                ms(report.init_reached)
            );
            reason.exit_code()
        }
        Err(error) => {
            eprintln!("husk-vmm: {error}");
            1
        }
    }
}
