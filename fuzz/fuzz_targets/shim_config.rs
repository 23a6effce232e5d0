//! cargo-fuzz entry point of `shim_config`; the body is `husk_fuzz_targets::shim_config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz_targets::shim_config(data));
