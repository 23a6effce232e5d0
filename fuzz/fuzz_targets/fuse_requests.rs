//! cargo-fuzz entry point of `fuse_requests`; the body is `husk_fuzz_targets::fuse_requests`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz_targets::fuse_requests(data));
