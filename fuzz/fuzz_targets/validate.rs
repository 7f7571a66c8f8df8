//! Fuzz target `validate`: see `moe_fuzz::fuzz_validate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moe_fuzz::fuzz_validate(data));
