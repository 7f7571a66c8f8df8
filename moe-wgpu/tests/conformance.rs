//! The golden conformance suite and the randomized property suite of `moe_core::conformance`
//! on the wgpu backend (lavapipe in CI). Skips with a message where no adapter exists.
//! `MOE_GOLDEN_DIR=<folder> cargo test -p moe-wgpu --release conformance` runs another case set.

mod common;

use common::Wgpu;
use moe_core::conformance::{run_golden_suite, run_property_suite};

#[test]
fn conformance_golden() {
    let Some(be) = common::backend() else { return };
    match run_golden_suite(&Wgpu(be)) {
        Ok(n) => println!("{n} golden checks passed"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_property() {
    let Some(be) = common::backend() else { return };
    match run_property_suite(&Wgpu(be), 60, 0x5eed) {
        Ok(n) => println!("{n} property checks passed"),
        Err(e) => panic!("{e}"),
    }
}

/// The same suites with f16 packed into u32 words (the path of adapters without SHADER_F16).
#[test]
fn conformance_golden_packed_f16() {
    let Some(be) = common::packed_backend() else { return };
    match run_golden_suite(&Wgpu(be)) {
        Ok(n) => println!("{n} golden checks passed (f16 packed)"),
        Err(e) => panic!("{e}"),
    }
}

/// The suites with the expert GEMMs' decode variant forced (the automatic choice takes it only
/// for few rows per expert) and with the tiled variant forced.
#[test]
fn conformance_golden_decode_gemm() {
    let Some(be) = common::decode_backend(false) else { return };
    match run_golden_suite(&Wgpu(be)) {
        Ok(n) => println!("{n} golden checks passed (decode GEMMs)"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_golden_decode_gemm_packed_f16() {
    let Some(be) = common::decode_backend(true) else { return };
    match run_golden_suite(&Wgpu(be)) {
        Ok(n) => println!("{n} golden checks passed (decode GEMMs, f16 packed)"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_property_decode_gemm() {
    let Some(be) = common::decode_backend(false) else { return };
    match run_property_suite(&Wgpu(be), 40, 0xdec0de) {
        Ok(n) => println!("{n} property checks passed (decode GEMMs)"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_golden_tiled_gemm() {
    let Some(be) = common::tiled_backend() else { return };
    match run_golden_suite(&Wgpu(be)) {
        Ok(n) => println!("{n} golden checks passed (tiled GEMMs)"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn conformance_golden_scalar_decode_gemm() {
    let Some(be) = common::scalar_decode_backend() else { return };
    match run_golden_suite(&Wgpu(be)) {
        Ok(n) => println!("{n} golden checks passed (scalar decode GEMMs)"),
        Err(e) => panic!("{e}"),
    }
    assert!(be.decode_gemm_dispatches() > 0, "the scalar decode variant never ran");
}
