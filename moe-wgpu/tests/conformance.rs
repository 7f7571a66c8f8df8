//! The golden conformance suite and the randomized property suite of `moe_core::conformance`
//! on the wgpu backend (lavapipe in CI). Skips with a message where no adapter exists.
//! `MOE_GOLDEN_DIR=<folder> cargo test -p moe-wgpu --release conformance` runs another case set.

mod common;

use moe_core::conformance::{ConformanceBackend, RunOutput, run_golden_suite, run_property_suite};
use moe_core::reference::HostWeights;
use moe_core::{DType, MoeConfig, MoeError, TopkReduce};
use moe_wgpu::WgpuBackend;

struct Wgpu(&'static WgpuBackend);

impl ConformanceBackend for Wgpu {
    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn run(
        &self,
        dtype: DType,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<RunOutput, MoeError> {
        let r = common::run(self.0, dtype, config, weights, x, tokens, 1)?;
        if r.buffers_created_in_forward != 0 {
            return Err(MoeError::Device {
                backend: "wgpu",
                what: "a forward created buffers",
                code: r.buffers_created_in_forward as i64,
            });
        }
        Ok(RunOutput { topk_ids: r.topk_ids, topk_weights: r.topk_weights, out: r.out })
    }

    /// A user-supplied top-k reduce cannot run in a shader.
    fn unsupported(&self, dtype: DType, config: &MoeConfig) -> bool {
        !self.0.supports(dtype) || matches!(config.router.reduce, TopkReduce::Custom(_))
    }
}

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
