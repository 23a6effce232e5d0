//! cargo-fuzz entry point of `hybrid_vsock_connect`; the body is `husk_fuzz_targets::hybrid_vsock_connect`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz_targets::hybrid_vsock_connect(data));
