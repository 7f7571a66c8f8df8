//! Edge shapes and determinism on the CPU backend: each configuration is checked against the
//! float64 reference in every element type (the conformance checks), and repeated runs must
//! give the same bits.

use moe_core::conformance::{
    Case, HostRunner, Rng, check_case, expected_from_reference, generated_case, rel_err,
    rounded_case,
};
use moe_core::*;
use moe_cpu::Cpu;

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
    let mut cases = vec![
        make("T=0", config(16, 8, 2, 8), 0, 1),
        make("T=1", config(16, 8, 2, 8), 1, 2),
        make("T=37 (no tile multiple)", config(16, 8, 2, 8), 37, 3),
        make("K=1", config(16, 8, 1, 8), 9, 4),
        make("K=E", config(16, 8, 8, 8), 9, 5),
        make("E=1", config(16, 1, 1, 8), 9, 6),
        make("E=512 K=8", config(16, 512, 8, 8), 16, 7),
        make("H=13 I=7", config(13, 8, 2, 7), 11, 8),
    ];
    let mut g = config(16, 16, 4, 8);
    g.router.scoring = Scoring::Sigmoid;
    g.router.groups = Some(GroupLimit { n_group: 1, topk_group: 1, score: GroupScore::Top2Sum });
    cases.push(make("one group", g, 12, 9));
    g.router.groups = Some(GroupLimit { n_group: 4, topk_group: 4, score: GroupScore::Top2Sum });
    cases.push(make("all groups", g, 12, 10));
    g.router.groups = Some(GroupLimit { n_group: 16, topk_group: 4, score: GroupScore::Max });
    cases.push(make("groups of one", g, 12, 11));
    // One expert receives every token, the others none: zero router weight, a large bias on 3.
    let mut c = config(16, 8, 1, 8);
    c.router.bias = true;
    let mut hot = make("one hot expert", c, 20, 12);
    hot.weights.router.iter_mut().for_each(|w| *w = 0.0);
    hot.weights.router_bias = Some((0..8).map(|e| if e == 3 { 5.0 } else { 0.0 }).collect());
    hot.expected = expected_from_reference(&hot).unwrap();
    assert!(hot.expected.topk_ids.iter().all(|&i| i == 3));
    cases.push(hot);
    for case in &cases {
        check(case);
    }
}

#[test]
fn a_million_tokens_without_index_overflow() {
    let c = config(8, 4, 2, 4);
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
