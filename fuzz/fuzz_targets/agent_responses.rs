//! cargo-fuzz entry point of `agent_responses`; the body is `husk_fuzz_targets::agent_responses`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz_targets::agent_responses(data));
