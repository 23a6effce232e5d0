//! cargo-fuzz entry point of `mmio_registers`; the body is `husk_fuzz_targets::mmio_registers`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz_targets::mmio_registers(data));
