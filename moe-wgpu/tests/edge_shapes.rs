//! Edge shapes on the wgpu backend (the same set as `moe-cpu/tests/edge_shapes.rs`), each
//! checked against the float64 reference in every element type, plus 2^20 tokens (grid
//! strides past 65535 workgroups) and run-to-run bitwise determinism on the golden cases.

mod common;

use common::{Wgpu, backend};
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
    let Some(be) = backend() else { return };
    let mut cases = edge_cases();
    cases.push(make("H=300 I=70 (many K tiles)", edge_config(300, 8, 2, 70), 40, 14));
    let b = Wgpu(be);
    for case in &cases {
        for dtype in DType::ALL {
            let r = check_case(&b, &rounded_case(case, dtype), dtype);
            println!("{}", r.line);
            assert!(r.passed, "{}", r.line);
        }
    }
}

#[test]
fn conformance_a_million_tokens() {
    let Some(be) = backend() else { return };
    // More than 65535 * 16 rows: the linear and route grids must stride. E = 2, K = 1 keeps
    // lavapipe's serial permute short.
    let c = edge_config(8, 2, 1, 4);
    let tokens = 1 << 20;
    let case = make("2^20 tokens", c, tokens, 13);
    let r = Wgpu(be).run(DType::F32, &c, &case.weights, &case.x, tokens).expect("run");
    let e = rel_err(&r.out, &case.expected.out);
    println!("conformance[wgpu] 2^20 tokens f32: rel err {e:.2e}");
    assert!(e < 1e-5);
}

#[test]
fn conformance_repeated_runs_give_the_same_bits() {
    let Some(be) = backend() else { return };
    let b = Wgpu(be);
    for case in
        moe_core::conformance::load_dir(&moe_core::conformance::golden_dir()).expect("golden")
    {
        for dtype in DType::ALL {
            let a = b.run(dtype, &case.config, &case.weights, &case.x, case.tokens).expect("run");
            let c = b.run(dtype, &case.config, &case.weights, &case.x, case.tokens).expect("run");
            assert!(
                a.out.iter().zip(&c.out).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{} {}",
                case.name,
                dtype.name()
            );
            assert_eq!(a.topk_ids, c.topk_ids);
        }
    }
    println!("conformance[wgpu] golden cases: two runs bitwise identical in f32/f16/bf16");
}
