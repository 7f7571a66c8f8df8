//! The golden conformance suite and the randomized property suite on the CPU backend.
//! `MOE_GOLDEN_DIR=<folder> cargo test -p moe-cpu --release conformance` runs another case set.

use moe_core::conformance::{HostRunner, run_golden_suite, run_property_suite};
use moe_cpu::Cpu;

#[test]
fn conformance_golden() {
    match run_golden_suite(&HostRunner(Cpu::new())) {
        Ok(n) => println!("{n} golden checks passed"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_property() {
    match run_property_suite(&HostRunner(Cpu::new()), 60, 0x5eed) {
        Ok(n) => println!("{n} property checks passed"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_rules() {
    match moe_core::conformance::run_rules_suite(&HostRunner(Cpu::new())) {
        Ok(n) => println!("{n} rule checks passed"),
        Err(e) => panic!("{e}"),
    }
}
