//! Small in-memory cases for Miri (no file I/O, a few tokens): every stage of the portable CPU
//! path in every element type, checked against the float64 reference. Also part of the normal
//! suite. `cargo +nightly miri test -p moe-cpu --test miri_small`.

use moe_core::DType;
use moe_core::conformance::{Force, HostRunner, check_case, random_case, rounded_case};
use moe_cpu::Cpu;

#[test]
fn small_cases_every_stage_every_dtype() {
    let b = HostRunner(Cpu::new());
    let forced = [
        Force { tokens: Some(3), ..Force::default() },
        Force { tokens: Some(2), one_group: true, ..Force::default() },
        Force { tokens: Some(2), k_equals_e: true, experts: Some(4), ..Force::default() },
        Force { tokens: Some(0), ..Force::default() },
    ];
    for (i, f) in forced.iter().enumerate() {
        let case = random_case(0xA11CE + i as u64, *f);
        for dtype in DType::ALL {
            let r = check_case(&b, &rounded_case(&case, dtype), dtype);
            println!("{}", r.line);
            assert!(r.passed, "{}", r.line);
        }
    }
}
