//! Fuzz target `plan`: see `moe_fuzz::fuzz_plan`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moe_fuzz::fuzz_plan(data));
