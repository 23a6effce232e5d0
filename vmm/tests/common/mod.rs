//! Helpers shared by the VMM's KVM tests: a few-instruction x86 assembler
//! for flat 32-bit payloads, a recording virtio device, and leak counters.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex};

use husk_devices::{ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt};
use vm_memory::GuestMemoryMmap;

/// Where payloads are loaded: 1 MiB, clear of the boot GDT and page tables.
pub const PAYLOAD_ADDRESS: u64 = 0x10_0000;
/// COM1's data register.
pub const COM1: u32 = 0x3f8;

/// Emits flat 32-bit machine code, one instruction per call.
#[derive(Default)]
pub struct Payload(Vec<u8>);

impl Payload {
    pub fn new() -> Self {
        Self::default()
    }
    /// `mov edx, imm32`
    pub fn mov_edx(mut self, value: u32) -> Self {
        self.0.push(0xba);
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// `mov al, imm8`
    pub fn mov_al(mut self, value: u8) -> Self {
        self.0.extend_from_slice(&[0xb0, value]);
        self
    }
    /// `out dx, al`
    pub fn out_dx_al(mut self) -> Self {
        self.0.push(0xee);
        self
    }
    /// `mov eax, [address]`
    pub fn load_eax(mut self, address: u32) -> Self {
        self.0.push(0xa1);
        self.0.extend_from_slice(&address.to_le_bytes());
        self
    }
    /// `mov dword [address], imm32`
    pub fn store_imm32(mut self, address: u32, value: u32) -> Self {
        self.0.extend_from_slice(&[0xc7, 0x05]);
        self.0.extend_from_slice(&address.to_le_bytes());
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// `mov ebx, imm32`
    pub fn mov_ebx(mut self, value: u32) -> Self {
        self.0.push(0xbb);
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// `mov eax, ebx`
    pub fn eax_from_ebx(mut self) -> Self {
        self.0.extend_from_slice(&[0x89, 0xd8]);
        self
    }
    /// `shr eax, 8`
    pub fn shr_eax_8(mut self) -> Self {
        self.0.extend_from_slice(&[0xc1, 0xe8, 0x08]);
        self
    }
    /// Spins until the 16-bit word at `address` equals `value`:
    /// `cmp word [address], imm8; jne` back to the `cmp`.
    pub fn wait_until_word_is(mut self, address: u32, value: u8) -> Self {
        self.0.extend_from_slice(&[0x66, 0x83, 0x3d]);
        self.0.extend_from_slice(&address.to_le_bytes());
        // The jump's offset counts from its own end: back over the 8-byte
        // cmp and the 2-byte jne.
        self.0.extend_from_slice(&[value, 0x75, (-10i8) as u8]);
        self
    }
    /// Writes `text` to COM1, byte by byte.
    pub fn serial_text(mut self, text: &[u8]) -> Self {
        self = self.mov_edx(COM1);
        for &byte in text {
            self = self.mov_al(byte).out_dx_al();
        }
        self
    }
    /// Writes EAX's four bytes (little endian) to COM1.
    pub fn serial_eax(mut self) -> Self {
        self = self.mov_edx(COM1);
        for _ in 0..4 {
            self = self.out_dx_al().shr_eax_8();
        }
        self
    }
    /// The i8042 CPU reset: `mov al, 0xfe; out 0x64, al`.
    pub fn i8042_reset(mut self) -> Self {
        self.0.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]);
        self
    }
    /// `cli; hlt` then loop: the vCPU sleeps for good.
    pub fn halt_forever(mut self) -> Self {
        self.0.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
        self
    }
    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Everything the guest did to a [`RecordingDevice`].
#[derive(Default, Debug)]
pub struct Recorded {
    pub config_writes: Vec<(u64, Vec<u8>)>,
}

/// A virtio device of any type that records config-space writes.
pub struct RecordingDevice {
    pub device_type: u32,
    pub recorded: Arc<Mutex<Recorded>>,
}

impl RecordingDevice {
    pub fn new(device_type: u32) -> (Self, Arc<Mutex<Recorded>>) {
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        (
            Self {
                device_type,
                recorded: recorded.clone(),
            },
            recorded,
        )
    }
}

impl VirtioDevice for RecordingDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn available_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.recorded
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _memory: GuestMemoryMmap,
        _interrupt: Arc<dyn VirtioInterrupt>,
        _queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// Open file descriptors of this process.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether this host has a usable /dev/kvm; tests that need it print why
/// they cannot run instead of passing silently.
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}
