//! KVM tests of the built-in VMM with tiny guest payloads: a few bytes of
//! flat 32-bit machine code assembled here prove that the vCPU loop, the
//! buses, the console, the i8042 reset and the virtio-mmio windows behave as
//! a guest sees them, without needing a guest kernel; one payload drives
//! the balloon through a whole free page report. Bad-input tests check
//! that every refused configuration names its problem and leaks nothing.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use husk_devices::balloon::BalloonDevice;
use husk_devices::{MMIO_MAGIC_VALUE, MMIO_VENDOR_ID};
use husk_vmm::{BuildError, SerialSink, SharedBuffer, VmBuilder, VmExit};

/// Payload runs are serialised so the fd and thread counts of one test are
/// not disturbed by another's VM.
static SERIAL: Mutex<()> = Mutex::new(());

/// A generous bound for payloads that end by themselves in microseconds
/// (PVM emulates non-paged code, so allow for slow hosts).
const PAYLOAD_DEADLINE: Duration = Duration::from_secs(20);

fn with_kvm(test: &str, body: impl FnOnce()) {
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    match kvm_available() {
        Ok(()) => {
            body();
            println!("husk-test-form: {test}: ran on /dev/kvm");
        }
        Err(why) => println!("husk-test-form: {test}: NOT RUN, no usable KVM ({why})"),
    }
}

fn run_payload(builder: VmBuilder) -> (VmExit, Vec<u8>) {
    let console = SharedBuffer::default();
    let vm = builder
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("payload VM builds");
    let (exit, _) = vm.run(Some(PAYLOAD_DEADLINE)).expect("payload VM runs");
    let output = console.0.lock().unwrap().clone();
    (exit, output)
}

#[test]
fn guest_serial_bytes_reach_the_host_sink() {
    with_kvm("serial payload", || {
        let payload = Payload::new()
            .serial_text(b"husk serial ok\n")
            .i8042_reset()
            .bytes();
        let (exit, output) = run_payload(VmBuilder::new().flat_image(payload, PAYLOAD_ADDRESS));
        assert_eq!(String::from_utf8_lossy(&output), "husk serial ok\n");
        assert_eq!(exit, VmExit::Reset);
    });
}

#[test]
fn i8042_cpu_reset_ends_the_vm_cleanly() {
    with_kvm("i8042 reset payload", || {
        let threads_before = thread_count();
        let fds_before = open_fd_count();
        let payload = Payload::new().i8042_reset().halt_forever().bytes();
        let (exit, _) = run_payload(
            VmBuilder::new()
                .vcpus(2)
                .flat_image(payload, PAYLOAD_ADDRESS),
        );
        assert_eq!(exit, VmExit::Reset);
        assert!(exit.is_clean());
        assert_eq!(exit.exit_code(), 0);
        assert_eq!(
            thread_count(),
            threads_before,
            "every vCPU thread was joined"
        );
        assert_eq!(
            open_fd_count(),
            fds_before,
            "every KVM and eventfd fd was closed"
        );
    });
}

#[test]
fn guest_reads_of_virtio_mmio_windows_identify_each_device() {
    with_kvm("virtio-mmio identification payload", || {
        let base = husk_arch::VIRTIO_MMIO_BASE as u32;
        let second = base + husk_arch::VIRTIO_MMIO_WINDOW_SIZE as u32;
        let payload = Payload::new()
            .load_eax(base) // MagicValue
            .serial_eax()
            .load_eax(base + 0x004) // Version
            .serial_eax()
            .load_eax(base + 0x008) // DeviceID of the first device
            .serial_eax()
            .load_eax(base + 0x00c) // VendorID
            .serial_eax()
            .load_eax(second + 0x008) // DeviceID of the second device
            .serial_eax()
            .i8042_reset()
            .bytes();
        let (vsock_like, _) = RecordingDevice::new(19);
        let (fs_like, _) = RecordingDevice::new(26);
        let (exit, output) = run_payload(
            VmBuilder::new()
                .flat_image(payload, PAYLOAD_ADDRESS)
                .virtio_device(Box::new(vsock_like))
                .virtio_device(Box::new(fs_like)),
        );
        assert_eq!(exit, VmExit::Reset);
        let words: Vec<u32> = output
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![MMIO_MAGIC_VALUE, 2, 19, MMIO_VENDOR_ID, 26]);
    });
}

#[test]
fn guest_mmio_write_reaches_only_the_addressed_device() {
    with_kvm("virtio-mmio write payload", || {
        let second = husk_arch::VIRTIO_MMIO_BASE as u32 + husk_arch::VIRTIO_MMIO_WINDOW_SIZE as u32;
        let payload = Payload::new()
            .store_imm32(second + 0x100 + 8, 0xdead_beef) // config space offset 8
            .i8042_reset()
            .bytes();
        let (first, first_seen) = RecordingDevice::new(19);
        let (target, target_seen) = RecordingDevice::new(26);
        let (exit, _) = run_payload(
            VmBuilder::new()
                .flat_image(payload, PAYLOAD_ADDRESS)
                .virtio_device(Box::new(first))
                .virtio_device(Box::new(target)),
        );
        assert_eq!(exit, VmExit::Reset);
        assert!(first_seen.lock().unwrap().config_writes.is_empty());
        assert_eq!(
            target_seen.lock().unwrap().config_writes,
            vec![(8, 0xdead_beefu32.to_le_bytes().to_vec())]
        );
    });
}

/// A guest driver in a few instructions: it writes to two pages, brings
/// the balloon up over virtio-mmio (REPORTING negotiated, three queues),
/// reports the first page free, waits for the chain to come back, then
/// prints both pages' first words and the interrupt status. Through KVM's
/// own view of guest memory, this proves the whole path: ioeventfd to the
/// worker, the range released (MADV_DONTNEED, followed by KVM's MMU
/// notifier), the chain used and the interrupt raised.
#[test]
fn a_page_the_guest_reports_free_reads_back_as_zeros_in_the_guest() {
    with_kvm("virtio-balloon report payload", || {
        let threads_before = thread_count();
        let window = husk_arch::VIRTIO_MMIO_BASE as u32;
        let reg = |offset: u32| window + offset;
        let (reported, kept) = (0x40_0000u32, 0x40_1000u32);
        let rings = |queue: u32| 0x20_0000 + queue * 0x1000;
        let (desc, avail, used) = (rings(2), rings(2) + 0x100, rings(2) + 0x200);
        let mut payload = Payload::new()
            .store_imm32(reported, 0xdead_beef)
            .store_imm32(kept, 0x1122_3344)
            .store_imm32(reg(0x070), 1 | 2) // ACKNOWLEDGE | DRIVER
            .store_imm32(reg(0x024), 0)
            .store_imm32(reg(0x020), 1 << 5) // VIRTIO_BALLOON_F_REPORTING
            .store_imm32(reg(0x024), 1)
            .store_imm32(reg(0x020), 1) // VIRTIO_F_VERSION_1
            .store_imm32(reg(0x070), 1 | 2 | 8); // FEATURES_OK
        for queue in 0..3 {
            payload = payload
                .store_imm32(reg(0x030), queue) // QueueSel
                .store_imm32(reg(0x038), 8) // QueueNum
                .store_imm32(reg(0x080), rings(queue)) // descriptor table
                .store_imm32(reg(0x090), rings(queue) + 0x100) // available ring
                .store_imm32(reg(0x0a0), rings(queue) + 0x200) // used ring
                .store_imm32(reg(0x044), 1); // QueueReady
        }
        let payload = payload
            .store_imm32(reg(0x070), 1 | 2 | 8 | 4) // DRIVER_OK
            // Descriptor 0: the reported page, device-writable, alone.
            .store_imm32(desc, reported)
            .store_imm32(desc + 4, 0)
            .store_imm32(desc + 8, 0x1000)
            .store_imm32(desc + 12, 2) // VIRTQ_DESC_F_WRITE, next 0
            .store_imm32(avail + 4, 0) // ring[0] = descriptor 0
            .store_imm32(avail, 1 << 16) // flags 0, idx 1
            .store_imm32(reg(0x050), 2) // QueueNotify: the reporting queue
            .wait_until_word_is(used + 2, 1)
            .load_eax(reported)
            .serial_eax()
            .load_eax(kept)
            .serial_eax()
            .load_eax(reg(0x060)) // InterruptStatus
            .serial_eax()
            .i8042_reset()
            .bytes();
        let (exit, output) = run_payload(
            VmBuilder::new()
                .flat_image(payload, PAYLOAD_ADDRESS)
                .virtio_device(Box::new(BalloonDevice::new())),
        );
        assert_eq!(exit, VmExit::Reset, "{output:?}");
        let words: Vec<u32> = output
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            words,
            vec![0, 0x1122_3344, 1],
            "the reported page reads zeros, its neighbour keeps its word, the used-ring interrupt is pending"
        );
        assert_eq!(
            thread_count(),
            threads_before,
            "the balloon worker ends with the VM"
        );
    });
}

#[test]
fn a_guest_that_never_ends_is_stopped_at_the_deadline_without_leaks() {
    with_kvm("deadline payload", || {
        let threads_before = thread_count();
        let fds_before = open_fd_count();
        let payload = Payload::new().serial_text(b"up\n").halt_forever().bytes();
        let console = SharedBuffer::default();
        let vm = VmBuilder::new()
            .vcpus(2)
            .flat_image(payload, PAYLOAD_ADDRESS)
            .serial(SerialSink::Writer(Box::new(console.clone())))
            .build()
            .unwrap();
        let (exit, report) = vm.run(Some(Duration::from_millis(300))).unwrap();
        assert_eq!(exit, VmExit::Timeout);
        assert_eq!(exit.exit_code(), 124);
        assert!(
            report.first_vcpu_entry.is_some(),
            "vCPU 0 entered the guest"
        );
        assert_eq!(&*console.0.lock().unwrap(), b"up\n");
        assert_eq!(thread_count(), threads_before);
        assert_eq!(open_fd_count(), fds_before);
    });
}

fn build_error(builder: VmBuilder) -> BuildError {
    match builder.serial(SerialSink::Null).build() {
        Ok(_) => panic!("the configuration was accepted"),
        Err(error) => error,
    }
}

#[test]
fn refused_configurations_name_the_problem_and_leak_nothing() {
    with_kvm("bad-input checks", || {
        let dir = std::env::temp_dir().join(format!("husk-bad-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corrupt = dir.join("corrupt-vmlinux");
        std::fs::write(&corrupt, b"\x7fELF this is not a real kernel").unwrap();
        let garbage = dir.join("garbage");
        std::fs::write(&garbage, vec![0u8; 8192]).unwrap();
        let huge_initrd = dir.join("huge-initrd");
        std::fs::File::create(&huge_initrd)
            .unwrap()
            .set_len(200 << 20)
            .unwrap();
        let kernel = std::env::var("HUSK_KERNEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/vmlinux")
            });
        let payload = Payload::new().i8042_reset().bytes();
        let threads_before = thread_count();
        let fds_before = open_fd_count();

        let cases: Vec<(&str, VmBuilder, &str)> = vec![
            (
                "zero vCPUs",
                VmBuilder::new()
                    .vcpus(0)
                    .flat_image(payload.clone(), PAYLOAD_ADDRESS),
                "at least one vCPU",
            ),
            (
                "255 vCPUs",
                VmBuilder::new()
                    .vcpus(255)
                    .flat_image(payload.clone(), PAYLOAD_ADDRESS),
                "255 vCPUs requested",
            ),
            (
                "1 MiB of memory",
                VmBuilder::new()
                    .memory_mib(1)
                    .flat_image(payload.clone(), PAYLOAD_ADDRESS),
                "1 MiB",
            ),
            (
                "missing kernel",
                VmBuilder::new().linux("/nonexistent/vmlinux", None, "console=ttyS0"),
                "/nonexistent/vmlinux",
            ),
            (
                "corrupt ELF kernel",
                VmBuilder::new().linux(&corrupt, None, "console=ttyS0"),
                "corrupt-vmlinux",
            ),
            (
                "not a kernel",
                VmBuilder::new().linux(&garbage, None, "console=ttyS0"),
                "neither an ELF vmlinux nor a bzImage",
            ),
            (
                "missing initrd",
                VmBuilder::new().linux(&kernel, Some(dir.join("nope.cpio")), ""),
                "nope.cpio",
            ),
            (
                "missing /dev/kvm",
                VmBuilder::new()
                    .kvm_path("/nonexistent/kvm")
                    .flat_image(payload.clone(), PAYLOAD_ADDRESS),
                "/nonexistent/kvm",
            ),
        ];
        for (case, builder, expected) in cases {
            let message = build_error(builder).to_string();
            assert!(
                message.contains(expected),
                "{case}: '{message}' does not mention '{expected}'"
            );
            println!("bad input '{case}' -> {message}");
        }
        if kernel.exists() {
            let message = build_error(VmBuilder::new().memory_mib(64).linux(
                &kernel,
                Some(huge_initrd.clone()),
                "",
            ))
            .to_string();
            assert!(
                message.contains("huge-initrd") && message.contains("does not fit"),
                "{message}"
            );
            println!("bad input 'initrd larger than memory' -> {message}");
        } else {
            panic!(
                "the guest kernel {} is missing: run `make kernel`",
                kernel.display()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            thread_count(),
            threads_before,
            "no thread outlived a refused VM"
        );
        assert_eq!(open_fd_count(), fds_before, "no fd outlived a refused VM");
    });
}
