//! Edge shapes on the wgpu backend (the same set as `moe-cpu/tests/edge_shapes.rs`), each
//! checked against the float64 reference in every element type, plus 2^20 tokens (grid
//! strides past 65535 workgroups) and run-to-run bitwise determinism on the golden cases.

mod common;

use common::{Wgpu, backend};
use moe_core::conformance::{
    Case, ConformanceBackend, Expected, Rng, check_case, expected_from_reference, random_weights,
    rel_err, rounded_case,
};
use moe_core::*;

fn config(hidden: usize, experts: usize, top_k: usize, inter: usize) -> MoeConfig {
    MoeConfig {
        hidden,
        experts,
        top_k,
        router: RouterConfig::default(),
        expert: ExpertConfig {
            mlp: MlpConfig {
                intermediate: inter,
                gated: true,
                activation: Activation::Silu,
                bias: false,
            },
            apply_weight_on_input: false,
        },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    }
}

fn make(name: &str, c: MoeConfig, tokens: usize, seed: u64) -> Case {
    let mut r = Rng::new(seed);
    let weights = random_weights(&c, &mut r);
    let x = r.tensor(tokens * c.hidden, 1.0);
    let mut case = Case {
        name: name.to_string(),
        config: c,
        weights,
        x,
        tokens,
        expected: Expected {
            topk_ids: vec![],
            topk_weights: vec![],
            margin: vec![],
            out: vec![],
            weights_include_output_scale: false,
        },
    };
    case.expected = expected_from_reference(&case).expect("reference");
    case
}

#[test]
fn conformance_edge_shapes() {
    let Some(be) = backend() else { return };
    let mut cases = vec![
        make("T=0", config(16, 8, 2, 8), 0, 1),
        make("T=1", config(16, 8, 2, 8), 1, 2),
        make("T=37 (no tile multiple)", config(16, 8, 2, 8), 37, 3),
        make("K=1", config(16, 8, 1, 8), 9, 4),
        make("K=E", config(16, 8, 8, 8), 9, 5),
        make("E=1", config(16, 1, 1, 8), 9, 6),
        make("E=512 K=8", config(16, 512, 8, 8), 16, 7),
        make("H=13 I=7", config(13, 8, 2, 7), 11, 8),
        make("H=300 I=70 (many K tiles)", config(300, 8, 2, 70), 40, 14),
    ];
    let mut g = config(16, 16, 4, 8);
    g.router.scoring = Scoring::Sigmoid;
    g.router.groups = Some(GroupLimit { n_group: 1, topk_group: 1, score: GroupScore::Top2Sum });
    cases.push(make("one group", g, 12, 9));
    g.router.groups = Some(GroupLimit { n_group: 4, topk_group: 4, score: GroupScore::Top2Sum });
    cases.push(make("all groups", g, 12, 10));
    g.router.groups = Some(GroupLimit { n_group: 16, topk_group: 4, score: GroupScore::Max });
    cases.push(make("groups of one", g, 12, 11));
    let mut c = config(16, 8, 1, 8);
    c.router.bias = true;
    let mut hot = make("one hot expert", c, 20, 12);
    hot.weights.router.iter_mut().for_each(|w| *w = 0.0);
    hot.weights.router_bias = Some((0..8).map(|e| if e == 3 { 5.0 } else { 0.0 }).collect());
    hot.expected = expected_from_reference(&hot).expect("reference");
    assert!(hot.expected.topk_ids.iter().all(|&i| i == 3));
    cases.push(hot);
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
    let c = config(8, 2, 1, 4);
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
