//! Edge shapes and determinism on the CUDA backend: the same edge-case list as the CPU and
//! wgpu tests (`moe_core::conformance::edge_cases`), each checked against the float64
//! reference in every element type, on the default and the pipelined GEMM kernels; 2^20
//! tokens (grids past 65535 blocks, 64-bit slot indices); and run-to-run bitwise determinism
//! on the golden cases. Without a CUDA driver or device each test prints why and passes.

mod common;

use moe_core::conformance::{
    Case, ConformanceBackend, Rng, check_case, edge_cases, edge_config, generated_case, rel_err,
    rounded_case,
};
use moe_core::*;

fn make(name: &str, c: MoeConfig, tokens: usize, seed: u64) -> Case {
    generated_case(name, c, tokens, &mut Rng::new(seed))
}

#[test]
fn conformance_edge_shapes() {
    let mut cases = edge_cases();
    cases.push(make("H=300 I=70 (many K tiles)", edge_config(300, 8, 2, 70), 40, 14));
    for tuning in common::TUNINGS {
        let Some(r) = common::runner_with("conformance_edge_shapes", tuning) else { return };
        let mut failed = Vec::new();
        for case in &cases {
            for dtype in DType::ALL {
                let res = check_case(&r, &rounded_case(case, dtype), dtype);
                println!("{}", res.line);
                if !res.passed {
                    failed.push(res.line);
                }
            }
        }
        assert!(failed.is_empty(), "{tuning:?}: {failed:#?}");
    }
}

#[test]
fn conformance_a_million_tokens() {
    let Some(r) = common::runner("conformance_a_million_tokens") else { return };
    let c = edge_config(8, 4, 2, 4);
    let tokens = 1 << 20;
    let case = make("2^20 tokens", c, tokens, 13);
    for dtype in [DType::F32, DType::BF16] {
        let case = rounded_case(&case, dtype);
        let out = r.run(dtype, &c, &case.weights, &case.x, tokens).expect("run");
        let e = rel_err(&out.out, &case.expected.out);
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        println!("conformance[cuda] 2^20 tokens {}: rel err {e:.2e} (tol {tol:e})", dtype.name());
        assert!(e < tol, "{}: {e}", dtype.name());
    }
}

#[test]
fn conformance_repeated_runs_give_the_same_bits() {
    let Some(r) = common::runner("conformance_repeated_runs_give_the_same_bits") else { return };
    let dir = moe_core::conformance::golden_dir();
    for case in moe_core::conformance::load_dir(&dir).expect("golden") {
        for dtype in DType::ALL {
            let a = r.run(dtype, &case.config, &case.weights, &case.x, case.tokens).expect("run");
            let b = r.run(dtype, &case.config, &case.weights, &case.x, case.tokens).expect("run");
            assert!(
                a.out.iter().zip(&b.out).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{} {}",
                case.name,
                dtype.name()
            );
            assert_eq!(a.topk_ids, b.topk_ids, "{} {}", case.name, dtype.name());
        }
    }
    println!("conformance[cuda] golden cases: two runs bitwise identical in f32/f16/bf16");
}
