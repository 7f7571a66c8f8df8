//! Edge shapes and determinism on the CPU backend: each configuration is checked against the
//! float64 reference in every element type (the conformance checks), and repeated runs must
//! give the same bits.

use moe_core::conformance::{
    Case, HostRunner, Rng, check_case, edge_cases, edge_config, generated_case, rel_err,
    rounded_case,
};
use moe_core::*;
use moe_cpu::Cpu;

fn make(name: &str, c: MoeConfig, tokens: usize, seed: u64) -> Case {
    generated_case(name, c, tokens, &mut Rng::new(seed))
}

fn check(case: &Case) {
    let b = HostRunner(Cpu::new());
    for dtype in DType::ALL {
        let r = check_case(&b, &rounded_case(case, dtype), dtype);
        println!("{}", r.line);
        assert!(r.passed, "{}", r.line);
    }
}

#[test]
fn edge_shapes_match_the_reference() {
    for case in &edge_cases() {
        check(case);
    }
}

#[test]
fn a_million_tokens_without_index_overflow() {
    let c = edge_config(8, 4, 2, 4);
    let tokens = 1 << 20;
    let case = make("2^20 tokens", c, tokens, 13);
    let plan = MoePlan::new(&c, tokens).unwrap();
    let ew = moe_core::conformance::ElementWeights::<f32>::from_host(&case.weights);
    let x: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
    let mut out = vec![f32::NAN; tokens * c.hidden];
    let mut ws = vec![0u8; plan.workspace_bytes(DType::F32).unwrap()];
    forward(
        &Cpu::new(),
        &plan,
        &ew.views::<Cpu>(),
        tokens,
        &x[..],
        &mut out[..],
        &mut ws[..],
        &SingleRank,
    )
    .unwrap();
    let out64: Vec<f64> = out.iter().map(|&v| v as f64).collect();
    let e = rel_err(&out64, &case.expected.out);
    println!("2^20 tokens: rel err {e:.2e}");
    assert!(e < 1e-5);
}

#[test]
fn repeated_runs_give_the_same_bits() {
    for case in moe_core::conformance::load_dir(&moe_core::conformance::golden_dir()).unwrap() {
        let b = HostRunner(Cpu::new());
        for dtype in DType::ALL {
            use moe_core::conformance::ConformanceBackend;
            let a = b.run(dtype, &case.config, &case.weights, &case.x, case.tokens).unwrap();
            let c = b.run(dtype, &case.config, &case.weights, &case.x, case.tokens).unwrap();
            assert!(
                a.out.iter().zip(&c.out).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{} {}",
                case.name,
                dtype.name()
            );
            assert_eq!(a.topk_ids, c.topk_ids);
        }
    }
}
