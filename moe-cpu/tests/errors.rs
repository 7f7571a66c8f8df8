//! Bad input gets a typed error, never a panic: every forward-level error is triggered here.

use moe_core::conformance::{Case, ElementWeights, golden_dir, load_dir};
use moe_core::reference::HostWeights;
use moe_core::*;
use moe_cpu::Cpu;

fn case(name: &str) -> Case {
    load_dir(&golden_dir()).unwrap().into_iter().find(|c| c.name == name).unwrap()
}

fn run(
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f32],
    tokens: usize,
    out_len: usize,
    ws_len: Option<usize>,
) -> Result<()> {
    let plan = MoePlan::new(c, tokens.max(1))?;
    let ew = ElementWeights::<f32>::from_host(w);
    let mut ws = vec![0u8; ws_len.unwrap_or(plan.workspace_bytes(DType::F32)?)];
    let mut out = vec![f32::NAN; out_len];
    forward(&Cpu::new(), &plan, &ew.views::<Cpu>(), tokens, x, &mut out, &mut ws, &SingleRank)
        .map(|_| ())
}

#[test]
fn every_forward_error_is_typed() {
    let k = case("qwen2_moe_shared_gate");
    let (c, w, t, h) = (k.config, k.weights.clone(), k.tokens, k.config.hidden);
    let x: Vec<f32> = k.x.iter().map(|&v| v as f32).collect();
    assert!(run(&c, &w, &x, t, t * h, None).is_ok());
    // Input and output lengths.
    let e = run(&c, &w, &x[1..], t, t * h, None).unwrap_err();
    assert!(matches!(e, MoeError::ShapeMismatch { what: "x", .. }), "{e}");
    let e = run(&c, &w, &x, t, t * h + 1, None).unwrap_err();
    assert!(matches!(e, MoeError::ShapeMismatch { what: "out", .. }), "{e}");
    // Workspace too small.
    let e = run(&c, &w, &x, t, t * h, Some(100)).unwrap_err();
    assert!(matches!(e, MoeError::WorkspaceTooSmall { got: 100, .. }), "{e}");
    // Weight shapes.
    let mut bad = w.clone();
    bad.experts.up.pop();
    let e = run(&c, &bad, &x, t, t * h, None).unwrap_err();
    assert!(matches!(e, MoeError::ShapeMismatch { what: "experts.up", .. }), "{e}");
    let mut bad = w.clone();
    bad.router.truncate(10);
    let e = run(&c, &bad, &x, t, t * h, None).unwrap_err();
    assert!(matches!(e, MoeError::ShapeMismatch { what: "router.weight", .. }), "{e}");
    // A tensor the config needs is missing, or one it does not use is present.
    let mut bad = w.clone();
    bad.shared.as_mut().unwrap().gate = None;
    let e = run(&c, &bad, &x, t, t * h, None).unwrap_err();
    assert!(
        matches!(e, MoeError::TensorPresence { what: "shared.gate_weight", required: true }),
        "{e}"
    );
    let mut bad = w.clone();
    bad.router_bias = Some(vec![0.0; c.experts]);
    let e = run(&c, &bad, &x, t, t * h, None).unwrap_err();
    assert!(matches!(e, MoeError::TensorPresence { what: "router.bias", required: false }), "{e}");
    let mut bad = w.clone();
    bad.shared = None;
    let e = run(&c, &bad, &x, t, t * h, None).unwrap_err();
    assert!(matches!(e, MoeError::TensorPresence { what: "shared", required: true }), "{e}");
    // More tokens than the plan.
    let plan = MoePlan::new(&c, t - 1).unwrap();
    let ew = ElementWeights::<f32>::from_host(&w);
    let mut ws = vec![0u8; plan.workspace_bytes(DType::F32).unwrap()];
    let mut out = vec![0f32; t * h];
    let e = forward(
        &Cpu::new(),
        &plan,
        &ew.views::<Cpu>(),
        t,
        &x[..],
        &mut out[..],
        &mut ws[..],
        &SingleRank,
    )
    .unwrap_err();
    assert!(matches!(e, MoeError::TooManyTokens { .. }), "{e}");
    // Non-finite input values.
    for bad_v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut xb = x.clone();
        xb[5] = bad_v;
        let e = run(&c, &w, &xb, t, t * h, None).unwrap_err();
        assert_eq!(e, MoeError::NonFiniteInput { what: "x", index: 5 });
    }
    // The float64 reference refuses a sharded config.
    let mut tp = c;
    tp.parallel.tp_size = 2;
    assert!(matches!(reference::forward(&tp, &w, &k.x, t), Err(MoeError::Unsupported { .. })));
}

#[test]
fn expert_map_is_checked_and_partitions_the_experts() {
    let k = case("mixtral");
    let (c, t, h, e) = (k.config, k.tokens, k.config.hidden, k.config.experts);
    let x: Vec<f32> = k.x.iter().map(|&v| v as f32).collect();
    let mut full = vec![0f32; t * h];
    {
        let plan = MoePlan::new(&c, t).unwrap();
        let ew = ElementWeights::<f32>::from_host(&k.weights);
        let mut ws = vec![0u8; plan.workspace_bytes(DType::F32).unwrap()];
        forward(
            &Cpu::new(),
            &plan,
            &ew.views::<Cpu>(),
            t,
            &x[..],
            &mut full[..],
            &mut ws[..],
            &SingleRank,
        )
        .unwrap();
    }
    // Two expert-parallel ranks: rank r holds experts r, r+2, r+4, ...; their outputs sum to the
    // full layer.
    let per = k.config.expert.mlp.intermediate * h;
    let mut sum = vec![0f64; t * h];
    for r in 0..2 {
        let mut rc = c;
        rc.parallel.experts =
            Some(ExpertPlacement { local_experts: e / 2, include_shared: r == 0 });
        let mut w = k.weights.clone();
        let keep = |m: &Vec<f64>| -> Vec<f64> {
            (0..e).filter(|g| g % 2 == r).flat_map(|g| m[g * per..(g + 1) * per].to_vec()).collect()
        };
        w.experts.gate = w.experts.gate.as_ref().map(keep);
        w.experts.up = keep(&w.experts.up);
        w.experts.down = keep(&w.experts.down);
        w.expert_map =
            Some((0..e as i32).map(|g| if g as usize % 2 == r { g / 2 } else { -1 }).collect());
        let mut out = vec![f32::NAN; t * h];
        run_into(&rc, &w, &x, t, &mut out).unwrap();
        sum.iter_mut().zip(&out).for_each(|(s, o)| *s += *o as f64);
        // A map that sends two experts to one local slot, or out of range, is rejected.
        let mut dup = w.clone();
        dup.expert_map.as_mut().unwrap()[r] = 0;
        dup.expert_map.as_mut().unwrap()[r + 2] = 0;
        let err = run_into(&rc, &dup, &x, t, &mut out).unwrap_err();
        assert!(matches!(err, MoeError::InvalidExpertMap { .. }), "{err}");
        let mut oob = w.clone();
        oob.expert_map.as_mut().unwrap()[r] = 99;
        let err = run_into(&rc, &oob, &x, t, &mut out).unwrap_err();
        assert!(matches!(err, MoeError::InvalidExpertMap { value: 99, .. }), "{err}");
        let mut none = w.clone();
        none.expert_map = None;
        let err = run_into(&rc, &none, &x, t, &mut out).unwrap_err();
        assert!(
            matches!(err, MoeError::TensorPresence { what: "expert_map", required: true }),
            "{err}"
        );
    }
    let full64: Vec<f64> = full.iter().map(|&v| v as f64).collect();
    let err = moe_core::conformance::rel_err(&sum, &full64);
    assert!(err < 1e-6, "expert-parallel ranks sum to the full layer: {err}");
}

fn run_into(c: &MoeConfig, w: &HostWeights, x: &[f32], t: usize, out: &mut [f32]) -> Result<()> {
    let plan = MoePlan::new(c, t)?;
    let ew = ElementWeights::<f32>::from_host(w);
    let mut ws = vec![0u8; plan.workspace_bytes(DType::F32)?];
    forward(&Cpu::new(), &plan, &ew.views::<Cpu>(), t, x, out, &mut ws, &SingleRank).map(|_| ())
}

#[test]
fn empty_batch_is_a_no_op() {
    let k = case("deepseek_v3");
    let plan = MoePlan::new(&k.config, 8).unwrap();
    let ew = ElementWeights::<f32>::from_host(&k.weights);
    let mut ws = vec![0u8; plan.workspace_bytes(DType::F32).unwrap()];
    let mut out: Vec<f32> = vec![];
    let r = forward(
        &Cpu::new(),
        &plan,
        &ew.views::<Cpu>(),
        0,
        &[][..],
        &mut out[..],
        &mut ws[..],
        &SingleRank,
    )
    .unwrap();
    assert_eq!(r.all_reduces(), 0);
}

#[test]
fn output_scale_placement_does_not_overflow_f16() {
    // Two experts whose outputs are about +-30000 and nearly cancel; scale 4. On the weights,
    // each weighted expert output (~60000 * 4) overflows f16 before the sum; on the output, the
    // sum is taken in f32 and scaled once, and the final result fits.
    let h = 4;
    let c = MoeConfig {
        hidden: h,
        experts: 2,
        top_k: 2,
        router: RouterConfig {
            reduce: TopkReduce::None,
            scale: RoutedScale { factor: 4.0, placement: ScalePlacement::OnOutput },
            ..RouterConfig::default()
        },
        expert: ExpertConfig {
            mlp: MlpConfig {
                intermediate: 1,
                gated: false,
                activation: Activation::Relu2,
                bias: false,
            },
            apply_weight_on_input: false,
        },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    };
    // Equal router logits: weights 0.5 each. Expert e: relu(x0)^2 * down_e.
    let w = HostWeights {
        router: vec![0.0; 2 * h],
        experts: moe_core::reference::HostMlp {
            up: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            down: vec![60000.0, 60000.0, 60000.0, 60000.0, -59936.0, -59936.0, -59936.0, -59936.0],
            ..Default::default()
        },
        ..Default::default()
    };
    let x = [1.0f64, 0.5, -0.5, 0.25];
    let want = reference::forward(&c, &w, &x, 1).unwrap().1; // 4 * 0.5 * 64 = 128
    assert!((want[0] - 128.0).abs() < 1e-9);
    let run16 = |c: &MoeConfig| {
        let plan = MoePlan::new(c, 1).unwrap();
        let ew = ElementWeights::<half::f16>::from_host(&w);
        let xe: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f64(v)).collect();
        let mut ws = vec![0u8; plan.workspace_bytes(DType::F16).unwrap()];
        let mut out = vec![half::f16::NAN; h];
        forward(
            &Cpu::new(),
            &plan,
            &ew.views::<Cpu>(),
            1,
            &xe[..],
            &mut out[..],
            &mut ws[..],
            &SingleRank,
        )
        .unwrap();
        out.iter().map(|v| v.to_f64()).collect::<Vec<_>>()
    };
    let on_output = run16(&c);
    assert!(on_output.iter().all(|v| (v - 128.0).abs() < 1.0), "{on_output:?}");
    let mut cw = c;
    cw.router.scale.placement = ScalePlacement::OnWeights;
    let on_weights = run16(&cw);
    assert!(
        on_weights.iter().any(|v| !v.is_finite()),
        "the weights placement overflows here: {on_weights:?}"
    );
}

#[test]
fn expert_parallel_latent_bias_is_added_once() {
    // Latent projections with biases and a shared expert, experts split over two ranks: the
    // ranks' outputs must sum to the full layer (fc2's bias and the shared expert once).
    let mut c = moe_core::conformance::random_case(
        77,
        moe_core::conformance::Force { tokens: Some(6), experts: Some(8), ..Default::default() },
    )
    .config;
    c.top_k = 2;
    c.router.groups = None;
    c.latent = Some(LatentConfig { size: 8, bias: true });
    c.shared = Some(SharedConfig {
        mlp: MlpConfig { intermediate: 8, gated: true, activation: Activation::Silu, bias: true },
        gate: SharedGate::None,
    });
    let case = moe_core::conformance::generated_case(
        "ep-latent",
        c,
        6,
        &mut moe_core::conformance::Rng::new(5),
    );
    let (t, h, e) = (case.tokens, c.hidden, c.experts);
    let x: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
    let mut full = vec![f32::NAN; t * h];
    run_into(&c, &case.weights, &x, t, &mut full).unwrap();
    let d = c.expert_width();
    let inter = c.expert.mlp.intermediate;
    let mut sum = vec![0f64; t * h];
    for r in 0..2usize {
        let mut rc = c;
        rc.parallel.experts =
            Some(ExpertPlacement { local_experts: e / 2, include_shared: r == 0 });
        let mut w = case.weights.clone();
        let keep = |m: &Vec<f64>, per: usize| -> Vec<f64> {
            (0..e).filter(|g| g % 2 == r).flat_map(|g| m[g * per..(g + 1) * per].to_vec()).collect()
        };
        w.experts.gate = w.experts.gate.as_ref().map(|m| keep(m, inter * d));
        w.experts.up = keep(&w.experts.up, inter * d);
        w.experts.down = keep(&w.experts.down, inter * d);
        w.experts.gate_bias = w.experts.gate_bias.as_ref().map(|m| keep(m, inter));
        w.experts.up_bias = w.experts.up_bias.as_ref().map(|m| keep(m, inter));
        w.experts.down_bias = w.experts.down_bias.as_ref().map(|m| keep(m, d));
        w.expert_map =
            Some((0..e as i32).map(|g| if g as usize % 2 == r { g / 2 } else { -1 }).collect());
        if r != 0 {
            w.latent.as_mut().unwrap().fc2_bias = None;
        }
        let mut out = vec![f32::NAN; t * h];
        run_into(&rc, &w, &x, t, &mut out).unwrap();
        sum.iter_mut().zip(&out).for_each(|(s, o)| *s += *o as f64);
    }
    let full64: Vec<f64> = full.iter().map(|&v| v as f64).collect();
    let err = moe_core::conformance::rel_err(&sum, &full64);
    assert!(err < 1e-6, "expert-parallel ranks with latent bias sum to the full layer: {err}");
}
