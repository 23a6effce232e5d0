//! cargo-fuzz entry point of `vsock_packets`; the body is `husk_fuzz_targets::vsock_packets`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz_targets::vsock_packets(data));
