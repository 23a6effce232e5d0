//! KVM tests of snapshots and restore, the mechanism of a pre-booted
//! template: a tiny payload sets up a virtio-balloon, leaves a mark in a
//! register, says "A" and spins until the host sets a flag; the host
//! pauses it there and saves a snapshot. VMs restored from that snapshot
//! must continue the same program from the same instruction (they never
//! say "A" again), with the register intact, and drive the balloon whose
//! queues were restored: a free page report goes through a new device
//! whose worker starts from the saved ring positions, and drops the VM's
//! private copy of the page. The template's
//! memory file must not change under them, and two restored VMs must not
//! see each other's writes.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use husk_devices::balloon::BalloonDevice;
use husk_vmm::snapshot::{check_restorable, MANIFEST_FILE, MEMORY_FILE};
use husk_vmm::{MicroVm, RunError, SerialSink, SharedBuffer, VmBuilder, VmExit};
use vm_memory::{Bytes, GuestAddress};

static SERIAL: Mutex<()> = Mutex::new(());

const PAYLOAD_DEADLINE: Duration = Duration::from_secs(20);
/// The word the payload spins on until the host sets it to 1.
const FLAG: u32 = 0x30_0000;
/// The page the payload reports free, and its neighbour.
const REPORTED: u32 = 0x40_0000;
const KEPT: u32 = 0x40_1000;
/// What the payload leaves in EBX before it spins.
const MARK: u32 = 0x5eed_cafe;

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

/// The payload: balloon set up to DRIVER_OK, "A", spin on FLAG, then one
/// free page report and the three words (reported page, kept page, EBX).
fn template_payload() -> Vec<u8> {
    let window = husk_arch::VIRTIO_MMIO_BASE as u32;
    let reg = |offset: u32| window + offset;
    let rings = |queue: u32| 0x20_0000 + queue * 0x1000;
    let (desc, avail, used) = (rings(2), rings(2) + 0x100, rings(2) + 0x200);
    let mut payload = Payload::new()
        .store_imm32(REPORTED, 0xdead_beef)
        .store_imm32(KEPT, 0x1122_3344)
        .store_imm32(reg(0x070), 1 | 2)
        .store_imm32(reg(0x024), 0)
        .store_imm32(reg(0x020), 1 << 5) // VIRTIO_BALLOON_F_REPORTING
        .store_imm32(reg(0x024), 1)
        .store_imm32(reg(0x020), 1) // VIRTIO_F_VERSION_1
        .store_imm32(reg(0x070), 1 | 2 | 8);
    for queue in 0..3 {
        payload = payload
            .store_imm32(reg(0x030), queue)
            .store_imm32(reg(0x038), 8)
            .store_imm32(reg(0x080), rings(queue))
            .store_imm32(reg(0x090), rings(queue) + 0x100)
            .store_imm32(reg(0x0a0), rings(queue) + 0x200)
            .store_imm32(reg(0x044), 1);
    }
    payload
        .store_imm32(reg(0x070), 1 | 2 | 8 | 4) // DRIVER_OK: the worker starts
        .mov_ebx(MARK)
        .serial_text(b"A")
        .wait_until_word_is(FLAG, 1)
        .store_imm32(desc, REPORTED)
        .store_imm32(desc + 4, 0)
        .store_imm32(desc + 8, 0x1000)
        .store_imm32(desc + 12, 2) // device-writable
        .store_imm32(avail + 4, 0)
        .store_imm32(avail, 1 << 16) // idx 1
        .store_imm32(reg(0x050), 2) // notify the reporting queue
        .wait_until_word_is(used + 2, 1)
        .load_eax(REPORTED)
        .serial_eax()
        .load_eax(KEPT)
        .serial_eax()
        .eax_from_ebx()
        .serial_eax()
        .i8042_reset()
        .bytes()
}

/// Waits until `console` holds `expected`.
fn wait_for_console(console: &SharedBuffer, expected: &[u8]) {
    let started = Instant::now();
    while console.0.lock().unwrap().as_slice() != expected {
        assert!(
            started.elapsed() < PAYLOAD_DEADLINE,
            "the console never read {expected:?}: {:?}",
            console.0.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Boots the payload, waits for "A", pauses it, saves it to `directory`.
/// Returns the paused VM.
fn take_template(directory: &Path) -> MicroVm {
    let console = SharedBuffer::default();
    let mut vm = VmBuilder::new()
        .flat_image(template_payload(), PAYLOAD_ADDRESS)
        .virtio_device(Box::new(BalloonDevice::new()))
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("the template VM builds");
    vm.start().expect("the template VM starts");
    wait_for_console(&console, b"A");
    vm.pause().expect("the template VM pauses");
    let summary = vm.snapshot(directory).expect("the snapshot is saved");
    assert_eq!((summary.vcpus, summary.devices), (1, 1));
    assert!(
        summary.memory_written_bytes < summary.memory_bytes / 8,
        "zero pages are holes: {summary:?}"
    );
    vm
}

fn restore(directory: &Path, console: &SharedBuffer) -> MicroVm {
    VmBuilder::new()
        .restore_snapshot(directory)
        .virtio_device(Box::new(BalloonDevice::new()))
        .serial(SerialSink::Writer(Box::new(console.clone())))
        .build()
        .expect("the snapshot restores")
}

fn words(output: &[u8]) -> Vec<u32> {
    output
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The word at guest address `address` in the snapshot's memory file
/// (the payload's RAM is the first region, at file offset 0).
fn template_word(directory: &Path, address: u32) -> u32 {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(directory.join(MEMORY_FILE)).unwrap();
    let mut bytes = [0u8; 4];
    file.read_exact_at(&mut bytes, u64::from(address)).unwrap();
    u32::from_le_bytes(bytes)
}

#[test]
fn restored_vms_continue_the_paused_program_with_their_devices() {
    with_kvm("snapshot and restore of a balloon payload", || {
        let threads_before = thread_count();
        let fds_before = open_fd_count();
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("template");
        drop(take_template(&snapshot));

        let mode = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&snapshot), 0o700);
        assert_eq!(mode(&snapshot.join(MEMORY_FILE)), 0o600);
        assert_eq!(mode(&snapshot.join(MANIFEST_FILE)), 0o600);

        let first_console = SharedBuffer::default();
        let first = restore(&snapshot, &first_console);
        let second_console = SharedBuffer::default();
        let second = restore(&snapshot, &second_console);
        // The first clone writes both pages (private copies); the second
        // must not see either.
        first
            .memory()
            .write_obj(0x7777_7777u32, GuestAddress(u64::from(KEPT)))
            .unwrap();
        first
            .memory()
            .write_obj(0x5555_5555u32, GuestAddress(u64::from(REPORTED)))
            .unwrap();
        for vm in [&first, &second] {
            vm.memory()
                .write_obj(1u32, GuestAddress(u64::from(FLAG)))
                .unwrap();
        }
        let (first_exit, _) = first.run(Some(PAYLOAD_DEADLINE)).unwrap();
        let (second_exit, _) = second.run(Some(PAYLOAD_DEADLINE)).unwrap();
        let first_output = first_console.0.lock().unwrap().clone();
        let second_output = second_console.0.lock().unwrap().clone();
        assert_eq!(first_exit, VmExit::Reset, "{first_output:?}");
        assert_eq!(second_exit, VmExit::Reset, "{second_output:?}");
        // Guest RAM restored from a template is a private file mapping: a
        // page the guest reports free loses the VM's own copy and reads the
        // template's again (husk_devices::balloon's discard table).
        assert_eq!(
            words(&first_output),
            vec![0xdead_beef, 0x7777_7777, MARK],
            "clone 1: no second \"A\" (it went on from the spin); the restored balloon \
             dropped its copy of the reported page; its other write kept; EBX restored"
        );
        assert_eq!(
            words(&second_output),
            vec![0xdead_beef, 0x1122_3344, MARK],
            "clone 2 does not see clone 1's writes"
        );
        assert_eq!(
            template_word(&snapshot, REPORTED),
            0xdead_beef,
            "neither a clone's write nor its freed page reaches the template"
        );
        assert_eq!(template_word(&snapshot, KEPT), 0x1122_3344);
        assert_eq!(
            thread_count(),
            threads_before,
            "no vCPU or device thread is left"
        );
        assert_eq!(open_fd_count(), fds_before, "no fd is left");
        println!(
            "snapshot: two clones continued after \"A\" with EBX {MARK:#x}; the template file kept its pages"
        );
    });
}

#[test]
fn a_paused_vm_resumes_where_it_stopped() {
    with_kvm("pause and resume of a balloon payload", || {
        let dir = tempfile::tempdir().unwrap();
        let console = SharedBuffer::default();
        let mut vm = VmBuilder::new()
            .flat_image(template_payload(), PAYLOAD_ADDRESS)
            .virtio_device(Box::new(BalloonDevice::new()))
            .serial(SerialSink::Writer(Box::new(console.clone())))
            .build()
            .unwrap();
        assert!(matches!(vm.pause(), Err(RunError::NotRunning)));
        assert!(matches!(vm.resume(), Err(RunError::NotPaused)));
        vm.start().unwrap();
        wait_for_console(&console, b"A");
        vm.pause().unwrap();
        assert!(vm.is_paused());
        assert!(matches!(vm.start(), Err(RunError::Paused)));
        // A snapshot leaves the VM paused and able to go on.
        vm.snapshot(&dir.path().join("taken")).unwrap();
        vm.memory()
            .write_obj(1u32, GuestAddress(u64::from(FLAG)))
            .unwrap();
        vm.resume().unwrap();
        let exit = vm.wait(Some(PAYLOAD_DEADLINE)).unwrap();
        vm.stop();
        let output = console.0.lock().unwrap().clone();
        assert_eq!(exit, Some(VmExit::Reset), "{output:?}");
        assert_eq!(output[0], b'A');
        assert_eq!(words(&output[1..]), vec![0, 0x1122_3344, MARK]);
    });
}

fn build_error(builder: VmBuilder) -> String {
    match builder.build() {
        Ok(_) => panic!("the restore should have been refused"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn bad_snapshots_and_bad_restores_are_refused_naming_the_problem() {
    with_kvm("refused snapshots and restores", || {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("template");
        let mut template = take_template(&snapshot);

        // Never overwrite, and only when paused.
        let again = template.snapshot(&snapshot).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        template.resume().unwrap();
        let running = template
            .snapshot(&dir.path().join("other"))
            .unwrap_err()
            .to_string();
        assert!(running.contains("must be paused"), "{running}");
        template.stop();
        assert!(!dir.path().join("other").exists());

        let fds_before = open_fd_count();
        check_restorable(&snapshot, &[5]).expect("a balloon VM may restore it");
        let fewer = check_restorable(&snapshot, &[]).unwrap_err().to_string();
        assert!(fewer.contains("1 virtio devices; 0 were given"), "{fewer}");
        let other = check_restorable(&snapshot, &[19]).unwrap_err().to_string();
        assert!(other.contains("types [5]; the VM has [19]"), "{other}");
        let missing = build_error(VmBuilder::new().restore_snapshot(dir.path().join("absent")));
        assert!(missing.contains("no snapshot directory at"), "{missing}");

        let no_device = build_error(VmBuilder::new().restore_snapshot(&snapshot));
        assert!(
            no_device.contains("1 virtio devices; 0 were given"),
            "{no_device}"
        );

        let (recording, _) = RecordingDevice::new(19);
        let wrong_type = build_error(
            VmBuilder::new()
                .restore_snapshot(&snapshot)
                .virtio_device(Box::new(recording)),
        );
        assert!(
            wrong_type.contains("device type 19") && wrong_type.contains("type 5"),
            "{wrong_type}"
        );

        let manifest = snapshot.join(MANIFEST_FILE);
        let original = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(
            &manifest,
            original.replacen("\"version\":1", "\"version\":99", 1),
        )
        .unwrap();
        let version = build_error(
            VmBuilder::new()
                .restore_snapshot(&snapshot)
                .virtio_device(Box::new(BalloonDevice::new())),
        );
        assert!(
            version.contains("husk-vmm-snapshot version 99"),
            "{version}"
        );

        let foreign = original.replacen("\"cpu_model\":\"", "\"cpu_model\":\"Other CPU ", 1);
        std::fs::write(&manifest, foreign).unwrap();
        let host = build_error(
            VmBuilder::new()
                .restore_snapshot(&snapshot)
                .virtio_device(Box::new(BalloonDevice::new())),
        );
        assert!(host.contains("CPU model is \"Other CPU"), "{host}");

        std::fs::write(&manifest, &original).unwrap();
        let memory = snapshot.join(MEMORY_FILE);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&memory)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let short = build_error(
            VmBuilder::new()
                .restore_snapshot(&snapshot)
                .virtio_device(Box::new(BalloonDevice::new())),
        );
        assert!(short.contains("holds 4096 bytes"), "{short}");
        assert_eq!(open_fd_count(), fds_before, "refused restores leave no fd");
    });
}

#[test]
fn a_device_that_cannot_pause_fails_the_pause_and_the_vm_goes_on() {
    with_kvm("pause refused by a device", || {
        let window = husk_arch::VIRTIO_MMIO_BASE as u32;
        let reg = |offset: u32| window + offset;
        let (recording, _) = RecordingDevice::new(19);
        let payload = Payload::new()
            .store_imm32(reg(0x070), 1 | 2)
            .store_imm32(reg(0x024), 1)
            .store_imm32(reg(0x020), 1)
            .store_imm32(reg(0x070), 1 | 2 | 8)
            .store_imm32(reg(0x070), 1 | 2 | 8 | 4) // activated, no queue
            .serial_text(b"A")
            .wait_until_word_is(FLAG, 1)
            .serial_text(b"B")
            .i8042_reset()
            .bytes();
        let console = SharedBuffer::default();
        let mut vm = VmBuilder::new()
            .flat_image(payload, PAYLOAD_ADDRESS)
            .virtio_device(Box::new(recording))
            .serial(SerialSink::Writer(Box::new(console.clone())))
            .build()
            .unwrap();
        vm.start().unwrap();
        wait_for_console(&console, b"A");
        let refused = vm.pause().unwrap_err().to_string();
        assert!(
            refused.contains("virtio device type 19 cannot be paused"),
            "{refused}"
        );
        assert!(!vm.is_paused());
        vm.memory()
            .write_obj(1u32, GuestAddress(u64::from(FLAG)))
            .unwrap();
        let exit = vm.wait(Some(PAYLOAD_DEADLINE)).unwrap();
        vm.stop();
        assert_eq!(exit, Some(VmExit::Reset));
        assert_eq!(console.0.lock().unwrap().as_slice(), b"AB");
    });
}
