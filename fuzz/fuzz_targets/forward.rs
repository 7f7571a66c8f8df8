//! Fuzz target `forward`: see `moe_fuzz::fuzz_forward`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moe_fuzz::fuzz_forward(data);
});
