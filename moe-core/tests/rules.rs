//! The selection rules (ties, NaN) and every configuration validation error.

use moe_core::math::{RouteScratch, route_token, select_topk};
use moe_core::*;

fn base() -> MoeConfig {
    MoeConfig {
        hidden: 8,
        experts: 8,
        top_k: 2,
        router: RouterConfig::default(),
        expert: ExpertConfig {
            mlp: MlpConfig {
                intermediate: 4,
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

fn route(c: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<i32>, Vec<f32>) {
    let e = c.experts;
    let ng = c.router.groups.map_or(0, |g| g.n_group);
    let (mut s, mut sel, mut g, mut st) =
        (vec![0f32; e], vec![0f32; e], vec![0f32; ng], vec![0f32; c.top_k]);
    let (mut ids, mut w) = (vec![0i32; c.top_k], vec![0f32; c.top_k]);
    route_token(
        c,
        logits,
        bias,
        RouteScratch { scores: &mut s, selection: &mut sel, groups: &mut g, staging: &mut st },
        &mut ids,
        &mut w,
    );
    (ids, w)
}

#[test]
fn ties_go_to_the_lower_expert_id() {
    let mut sel = vec![1.0f32, 3.0, 2.0, 3.0, 3.0];
    let mut ids = vec![0; 4];
    select_topk(&mut sel, &mut ids);
    assert_eq!(ids, [1, 3, 4, 2]);
    // Through the router, with equal logits everywhere: experts 0 and 1.
    let c = base();
    let (ids, w) = route(&c, &[0.5; 8], None);
    assert_eq!(ids, [0, 1]);
    assert_eq!(w, [0.5, 0.5]);
}

#[test]
fn group_ties_go_to_the_lower_group() {
    let mut c = base();
    c.router.scoring = Scoring::Sigmoid;
    c.router.groups = Some(GroupLimit { n_group: 4, topk_group: 1, score: GroupScore::Top2Sum });
    // Groups {0,1} {2,3} {4,5} {6,7}: groups 1 and 2 tie on top2 sums; group 1 wins.
    let logits = [0.0, 0.0, 1.0, 2.0, 2.0, 1.0, -1.0, 0.5];
    let (ids, _) = route(&c, &logits, None);
    assert_eq!(ids, [3, 2]);
}

#[test]
fn nan_scores_are_never_selected() {
    let mut sel = vec![f32::NAN, 1.0, f32::NAN, 0.5];
    let mut ids = vec![0; 3];
    select_topk(&mut sel, &mut ids);
    assert_eq!(ids, [1, 3, -1], "NaN never chosen; missing slots are -1");
    let mut c = base();
    c.router.scoring = Scoring::Sigmoid;
    c.top_k = 3;
    let logits = [f32::NAN, 0.1, f32::NAN, 0.3, f32::NAN, f32::NAN, f32::NAN, f32::NAN];
    let (ids, w) = route(&c, &logits, None);
    assert_eq!(ids, [3, 1, -1]);
    assert_eq!(w[2], 0.0);
    assert!((w[0] + w[1] - 1.0).abs() < 1e-6, "renormalized over the valid slots: {w:?}");
    // Softmax with a NaN logit is undefined everywhere: nothing is selected.
    c.router.scoring = Scoring::Softmax;
    let (ids, w) = route(&c, &logits, None);
    assert_eq!(ids, [-1, -1, -1]);
    assert_eq!(w, [0.0; 3]);
    // -inf is an ordinary lowest value and can be selected.
    c.router.scoring = Scoring::None;
    c.router.reduce = TopkReduce::None;
    c.router.weights = WeightSource::SigmoidTopkLogits;
    let (ids, _) = route(&c, &[f32::NEG_INFINITY; 8], None);
    assert_eq!(ids, [0, 1, 2]);
}

#[test]
fn selection_bias_selects_but_does_not_weigh() {
    let mut c = base();
    c.router.scoring = Scoring::Sigmoid;
    c.router.selection_bias = true;
    c.router.reduce = TopkReduce::None;
    let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0];
    let logits = [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0];
    let (ids, w) = route(&c, &logits, Some(&bias));
    assert_eq!(ids, [7, 0]);
    assert!((w[0] - 1.0 / (1.0 + 3f32.exp())).abs() < 1e-6);
}

#[track_caller]
fn rejects(c: MoeConfig, want: fn(&MoeError) -> bool) {
    match c.validate() {
        Err(e) => assert!(want(&e), "unexpected error {e:?}"),
        Ok(()) => panic!("config accepted: {c:?}"),
    }
    assert!(MoePlan::new(&c, 4).is_err());
}

#[test]
fn every_config_error_is_reported() {
    assert!(base().validate().is_ok());
    let mut c = base();
    c.hidden = 0;
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { what: "hidden" }));
    let mut c = base();
    c.experts = 0;
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { what: "experts" }));
    let mut c = base();
    c.expert.mlp.intermediate = 0;
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { what: "expert.intermediate" }));
    let mut c = base();
    c.top_k = 0;
    rejects(c, |e| matches!(e, MoeError::TopKZero));
    let mut c = base();
    c.top_k = 9;
    rejects(c, |e| matches!(e, MoeError::TopKTooLarge { top_k: 9, experts: 8 }));
    let mut c = base();
    c.router.groups = Some(GroupLimit { n_group: 3, topk_group: 1, score: GroupScore::Max });
    rejects(c, |e| matches!(e, MoeError::GroupsDoNotDivide { experts: 8, n_group: 3 }));
    let mut c = base();
    c.router.groups = Some(GroupLimit { n_group: 4, topk_group: 5, score: GroupScore::Max });
    rejects(c, |e| matches!(e, MoeError::TopkGroupInvalid { topk_group: 5, n_group: 4 }));
    let mut c = base();
    c.router.groups = Some(GroupLimit { n_group: 4, topk_group: 0, score: GroupScore::Max });
    rejects(c, |e| matches!(e, MoeError::TopkGroupInvalid { .. }));
    let mut c = base();
    c.router.groups = Some(GroupLimit { n_group: 0, topk_group: 0, score: GroupScore::Max });
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { .. }));
    let mut c = base();
    c.top_k = 3;
    c.router.groups = Some(GroupLimit { n_group: 4, topk_group: 1, score: GroupScore::Max });
    rejects(c, |e| matches!(e, MoeError::TopKExceedsGroups { top_k: 3, reachable: 2 }));
    let mut c = base();
    c.top_k = 1;
    c.router.groups = Some(GroupLimit { n_group: 8, topk_group: 1, score: GroupScore::Top2Sum });
    rejects(c, |e| matches!(e, MoeError::GroupTooSmallForTop2 { experts_per_group: 1 }));
    let mut c = base();
    c.router.scale.factor = f64::NAN;
    rejects(c, |e| matches!(e, MoeError::NonFiniteParameter { what: "router.scale.factor", .. }));
    let mut c = base();
    c.router.reduce = TopkReduce::Sum { eps: f64::INFINITY };
    rejects(c, |e| matches!(e, MoeError::NonFiniteParameter { what: "router.reduce.eps", .. }));
    let mut c = base();
    c.router.reduce = TopkReduce::Sum { eps: -1.0 };
    rejects(c, |e| matches!(e, MoeError::InvalidParameter { what: "router.reduce.eps", .. }));
    let mut c = base();
    c.router.reduce = TopkReduce::ClampMin { min: 0.0 };
    rejects(c, |e| matches!(e, MoeError::InvalidParameter { what: "router.reduce.min", .. }));
    let mut c = base();
    c.router.reduce = TopkReduce::PNorm { p: f64::NAN };
    rejects(c, |e| matches!(e, MoeError::NonFiniteParameter { what: "router.reduce.p", .. }));
    let mut c = base();
    c.router.reduce = TopkReduce::PNorm { p: -2.0 };
    rejects(c, |e| matches!(e, MoeError::InvalidParameter { what: "router.reduce.p", .. }));
    let mut c = base();
    c.expert.mlp.activation = Activation::SwigluOai { alpha: 1.702, limit: -1.0 };
    rejects(c, |e| matches!(e, MoeError::InvalidParameter { what: "swiglu_oai.limit", .. }));
    let mut c = base();
    c.expert.mlp.activation = Activation::SwigluOai { alpha: f64::NAN, limit: 7.0 };
    rejects(c, |e| matches!(e, MoeError::NonFiniteParameter { what: "swiglu_oai.alpha", .. }));
    let mut c = base();
    c.expert.mlp.gated = false;
    c.expert.mlp.activation = Activation::SwigluOai { alpha: 1.702, limit: 7.0 };
    rejects(c, |e| matches!(e, MoeError::InconsistentConfig { .. }));
    let mut c = base();
    c.parallel.tp_size = 0;
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { what: "parallel.tp_size" }));
    let mut c = base();
    c.parallel.tp_size = 2;
    c.parallel.tp_rank = 2;
    rejects(c, |e| matches!(e, MoeError::InvalidParameter { what: "parallel.tp_rank", .. }));
    let mut c = base();
    c.parallel.tp_size = 3;
    rejects(c, |e| matches!(e, MoeError::InvalidParameter { what: "expert.intermediate", .. }));
    let mut c = base();
    c.parallel.experts = Some(ExpertPlacement { local_experts: 9, include_shared: true });
    rejects(c, |e| {
        matches!(e, MoeError::InvalidParameter { what: "parallel.experts.local_experts", .. })
    });
    let mut c = base();
    c.parallel.experts = Some(ExpertPlacement { local_experts: 0, include_shared: true });
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { .. }));
    let mut c = base();
    c.latent = Some(LatentConfig { size: 0, bias: false });
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { what: "latent.size" }));
    let mut c = base();
    c.shared = Some(SharedConfig {
        mlp: MlpConfig { intermediate: 0, gated: true, activation: Activation::Silu, bias: false },
        gate: SharedGate::None,
    });
    rejects(c, |e| matches!(e, MoeError::ZeroDimension { what: "shared.intermediate" }));
    // Plan-level: row alignment and token counts that overflow.
    assert!(matches!(
        MoePlan::with_row_align(&base(), 4, 0),
        Err(MoeError::ZeroDimension { what: "row_align" })
    ));
    assert!(matches!(
        MoePlan::new(&base(), usize::MAX / 2),
        Err(MoeError::InvalidParameter { what: "max_tokens", .. })
    ));
    // Every error prints a message.
    assert!(MoeError::TopKZero.to_string().contains("top_k"));
}

#[test]
fn k_equals_e_and_one_expert_are_valid() {
    let mut c = base();
    c.top_k = 8;
    c.router.groups = Some(GroupLimit { n_group: 2, topk_group: 2, score: GroupScore::Top2Sum });
    assert!(c.validate().is_ok());
    let (ids, _) = route(&c, &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], None);
    assert_eq!(ids, [7, 6, 5, 4, 3, 2, 1, 0]);
    c.experts = 1;
    c.top_k = 1;
    c.router.groups = None;
    assert!(c.validate().is_ok());
}

#[test]
fn workspace_layout_is_aligned_and_ordered() {
    let plan = MoePlan::with_row_align(&base(), 37, 16).unwrap();
    let l = plan.layout(DType::BF16).unwrap();
    let regions = [
        l.logits,
        l.topk_ids,
        l.topk_weights,
        l.route_scratch,
        l.expert_offsets,
        l.expert_cursor,
        l.sorted_slots,
        l.slot_rows,
        l.hidden,
        l.expert_out,
    ];
    for w in regions.windows(2) {
        assert!(w[0].offset <= w[1].offset);
        assert_eq!(w[1].offset % REGION_ALIGN, 0);
    }
    assert_eq!(l.sorted_slots.len, 37 * 2 + 8 * 15);
    assert_eq!(plan.workspace_bytes(DType::BF16).unwrap(), l.total_bytes);
    assert!(plan.workspace_bytes(DType::F32).unwrap() > l.total_bytes);
}

#[test]
fn huge_shapes_are_errors_not_overflows() {
    let mut c = base();
    c.hidden = usize::MAX / 4;
    c.experts = 8;
    assert!(matches!(c.validate(), Err(MoeError::InvalidParameter { what: "router.weight", .. })));
    let mut c = base();
    c.expert.mlp.intermediate = 1 << 40;
    c.hidden = 1 << 30;
    assert!(matches!(c.validate(), Err(MoeError::InvalidParameter { .. })));
    assert!(matches!(
        MoePlan::with_row_align(&base(), 4, usize::MAX),
        Err(MoeError::InvalidParameter { what: "permuted rows", .. })
    ));
    assert!(MoePlan::new(&base(), 1 << 20).is_ok(), "a million tokens plan fine");
}
