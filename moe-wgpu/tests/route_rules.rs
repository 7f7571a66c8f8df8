//! The route shader against `moe_core::math::route_token` in f32 on crafted logits: ties
//! (lower id wins, also between groups), NaN (never selected; all-NaN groups never chosen;
//! missing slots are -1 with weight 0), -inf (selectable), every scoring / group score /
//! weight source / reduce, the scale on the weights, and the expert map in permute.

mod common;

use common::{backend, read, read_i32, upload_bytes};
use moe_core::math::{RouteScratch, route_token};
use moe_core::*;
use moe_wgpu::{WgpuBackend, WgpuView, WgpuViewMut};

fn base(e: usize, k: usize) -> MoeConfig {
    MoeConfig {
        hidden: 8,
        experts: e,
        top_k: k,
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

fn cpu_route(c: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<i32>, Vec<f32>) {
    let (e, k) = (c.experts, c.top_k);
    let t = logits.len() / e;
    let ng = c.router.groups.map_or(0, |g| g.n_group);
    let (mut ids, mut w) = (vec![0i32; t * k], vec![0f32; t * k]);
    for tok in 0..t {
        let (mut s, mut sel, mut g, mut st) =
            (vec![0f32; e], vec![0f32; e], vec![0f32; ng], vec![0f32; k]);
        route_token(
            c,
            &logits[tok * e..(tok + 1) * e],
            bias,
            RouteScratch { scores: &mut s, selection: &mut sel, groups: &mut g, staging: &mut st },
            &mut ids[tok * k..(tok + 1) * k],
            &mut w[tok * k..(tok + 1) * k],
        );
    }
    (ids, w)
}

fn gpu_route(
    be: &WgpuBackend,
    c: &MoeConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<i32>, Vec<f32>) {
    let (e, k) = (c.experts, c.top_k);
    let t = logits.len() / e;
    let lb = upload_bytes(be, bytemuck::cast_slice(logits), logits.len());
    let bb = bias.map(|b| upload_bytes(be, bytemuck::cast_slice(b), b.len()));
    let out = upload_bytes(be, &vec![0xFF; 8 * t * k + 4], 2 * t * k + 1);
    let ids = WgpuViewMut::<i32>::new(&out.buf, 0, t * k).expect("ids");
    let w = WgpuViewMut::<f32>::new(&out.buf, 4 * (t * k) as u64, t * k).expect("weights");
    let scratch = upload_bytes(be, &[0xFF; 16], 4);
    MoeStages::<f32>::route(
        be,
        c,
        t,
        lb.view(),
        bb.as_ref().map(|b| b.view()),
        scratch.view_mut(),
        ids,
        w,
    )
    .expect("route");
    be.synchronize().expect("sync");
    let ids = read_i32(be, &out.buf, 0, t * k);
    let w =
        read::<f32>(be, &out.buf, 4 * (t * k) as u64, t * k).iter().map(|&v| v as f32).collect();
    (ids, w)
}

fn same(name: &str, c: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) {
    let Some(be) = backend() else { return };
    let (ci, cw) = cpu_route(c, logits, bias);
    let (gi, gw) = gpu_route(be, c, logits, bias);
    assert_eq!(gi, ci, "{name}: ids");
    for (j, (a, b)) in gw.iter().zip(&cw).enumerate() {
        let ok = (a - b).abs() <= 2e-6 * b.abs().max(1.0) || (a.is_nan() && b.is_nan());
        assert!(ok, "{name}: weight {j}: gpu {a} cpu {b}");
    }
    println!("conformance route {name}: ids {gi:?} ok");
}

const NAN: f32 = f32::NAN;
const NINF: f32 = f32::NEG_INFINITY;

#[test]
fn conformance_route_rules() {
    let c = base(8, 2);
    same("all equal: lower ids win", &c, &[0.5; 8], None);
    let mut c3 = base(8, 3);
    c3.router.scoring = Scoring::Sigmoid;
    same(
        "sigmoid: NaN never selected, -1 slots",
        &c3,
        &[NAN, 0.1, NAN, 0.3, NAN, NAN, NAN, NAN],
        None,
    );
    same(
        "softmax: a NaN logit poisons every score",
        &base(8, 2),
        &[0.1, NAN, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0],
        None,
    );
    let mut n = base(8, 3);
    n.router.scoring = Scoring::None;
    n.router.reduce = TopkReduce::None;
    n.router.weights = WeightSource::SoftmaxTopkLogits;
    same("none: -inf is selectable", &n, &[NINF, NAN, NINF, NAN, NAN, 1.0, NAN, NAN], None);
    let mut g = base(8, 2);
    g.router.scoring = Scoring::Sigmoid;
    g.router.groups = Some(GroupLimit { n_group: 4, topk_group: 1, score: GroupScore::Top2Sum });
    same("group ties: lower group wins", &g, &[0.0, 0.0, 1.0, 2.0, 2.0, 1.0, -1.0, 0.5], None);
    g.router.groups = Some(GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Max });
    same(
        "all-NaN group never chosen",
        &g,
        &[NAN, NAN, -3.0, -2.0, -5.0, -4.0, NAN, -9.0],
        Some(&[0.0, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0, 0.0]),
    );
    // Random tokens through every mode.
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        ((rng >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32
    };
    let logits: Vec<f32> = (0..40 * 16).map(|_| next()).collect();
    let bias: Vec<f32> = (0..16).map(|_| next() * 0.05).collect();
    for scoring in [Scoring::Softmax, Scoring::Sigmoid, Scoring::None] {
        for weights in
            [WeightSource::Scores, WeightSource::SoftmaxTopkLogits, WeightSource::SigmoidTopkLogits]
        {
            for reduce in [
                TopkReduce::None,
                TopkReduce::Sum { eps: 0.0 },
                TopkReduce::NOAUX_TC,
                TopkReduce::ClampMin { min: 0.7 },
                TopkReduce::PNorm { p: 2.5 },
            ] {
                for groups in [
                    None,
                    Some(GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Top2Sum }),
                    Some(GroupLimit { n_group: 8, topk_group: 3, score: GroupScore::Max }),
                ] {
                    let mut c = base(16, 4);
                    c.router.scoring = scoring;
                    c.router.weights = weights;
                    c.router.reduce = reduce;
                    c.router.groups = groups;
                    c.router.selection_bias = true;
                    c.router.scale =
                        RoutedScale { factor: 2.5, placement: ScalePlacement::OnWeights };
                    let name = format!("{scoring:?}/{weights:?}/{reduce:?}/{groups:?}");
                    same(&name, &c, &logits, Some(&bias));
                }
            }
        }
    }
}

#[test]
fn conformance_permute_with_expert_map_and_row_align() {
    let Some(be) = backend() else { return };
    // 5 tokens, K = 3, E = 6 global experts; experts 1, 4, 5 live here as locals 2, 0, 1.
    let mut c = base(6, 3);
    c.parallel.experts = Some(ExpertPlacement { local_experts: 3, include_shared: true });
    let plan = MoePlan::with_row_align(&c, 5, 4).expect("plan");
    let ids: Vec<i32> = vec![1, 4, 0, 5, -1, 2, 4, 1, 3, 0, 2, -1, 5, 4, 1];
    let map: Vec<i32> = vec![-1, 2, -1, -1, 0, 1];
    let ib = upload_bytes(be, bytemuck::cast_slice(&ids), ids.len());
    let mb = upload_bytes(be, bytemuck::cast_slice(&map), map.len());
    let rows = plan.rows_capacity(5);
    let n = 4 + 3 + rows + 15;
    let out = upload_bytes(be, &vec![0xFF; 4 * n], n);
    let v = |off: usize, len: usize| {
        WgpuViewMut::<i32>::new(&out.buf, 4 * off as u64, len).expect("view")
    };
    MoeStages::<f32>::permute(
        be,
        &plan,
        5,
        WgpuView::new(&ib.buf, 0, 15).expect("ids"),
        Some(mb.view()),
        PermuteBuffers {
            expert_offsets: v(0, 4),
            expert_cursor: v(4, 3),
            sorted_slots: v(7, rows),
            slot_rows: v(7 + rows, 15),
        },
    )
    .expect("permute");
    be.synchronize().expect("sync");
    let got = read_i32(be, &out.buf, 0, n);
    // Local 0 (global 4): slots 1, 6, 13; local 1 (global 5): 3, 12; local 2 (global 1):
    // 0, 7, 14. Blocks padded to 4 rows.
    assert_eq!(&got[0..4], &[0, 4, 8, 12], "offsets");
    let sorted = &got[7..7 + 12];
    assert_eq!(sorted, &[1, 6, 13, -1, 3, 12, -1, -1, 0, 7, 14, -1], "sorted slots");
    let slot_rows = &got[7 + rows..7 + rows + 15];
    assert_eq!(slot_rows, &[8, 0, -1, 4, -1, -1, 1, 9, -1, -1, -1, -1, 5, 2, 10], "slot rows");
    println!("conformance permute: expert map + row_align 4 ok");
}

#[test]
fn conformance_expert_map_host_check() {
    use moe_wgpu::check_expert_map;
    assert!(check_expert_map(&[-1, 2, -1, -1, 0, 1], 6, 3).is_ok());
    let dup = check_expert_map(&[0, 2, -1, -1, 0, 1], 6, 3).expect_err("duplicate");
    assert!(matches!(dup, MoeError::InvalidExpertMap { expert: 4, value: 0 }), "{dup}");
    let oob = check_expert_map(&[99, 2, -1, -1, 0, 1], 6, 3).expect_err("out of range");
    assert!(matches!(oob, MoeError::InvalidExpertMap { expert: 0, value: 99 }), "{oob}");
    let neg = check_expert_map(&[-2, 2, -1, -1, 0, 1], 6, 3).expect_err("below -1");
    assert!(matches!(neg, MoeError::InvalidExpertMap { value: -2, .. }), "{neg}");
    assert!(matches!(check_expert_map(&[0], 6, 3), Err(MoeError::ShapeMismatch { .. })));
}

/// Route `e` experts with equal logits, top `k`: the ids (0..k where it runs).
fn route_ties(be: &WgpuBackend, e: usize, k: usize) -> moe_core::Result<Vec<i32>> {
    let c = base(e, k);
    let logits = vec![0.25f32; e];
    let lb = upload_bytes(be, bytemuck::cast_slice(&logits), e);
    let out = upload_bytes(be, &vec![0xFF; 8 * k], 2 * k);
    let scratch = upload_bytes(be, &[0xFF; 16], 4);
    MoeStages::<f32>::route(
        be,
        &c,
        1,
        lb.view(),
        None,
        scratch.view_mut(),
        WgpuViewMut::new(&out.buf, 0, k).expect("ids"),
        WgpuViewMut::new(&out.buf, 4 * k as u64, k).expect("weights"),
    )?;
    be.synchronize().expect("sync");
    Ok(read_i32(be, &out.buf, 0, k))
}

#[test]
fn conformance_llvmpipe_loop_cap_is_a_typed_error() {
    let Some(be) = backend() else { return };
    // top_k = experts = 512: the workgroup route (experts <= 1024) stays within llvmpipe's
    // loop cap (the per-invocation route would need 512 * 513 selection steps).
    let ids = route_ties(be, 512, 512).expect("route 512 of 512");
    assert_eq!(ids, (0..512).collect::<Vec<i32>>());
    // 2048 experts (past the workgroup route), top 64: 64 * 2049 steps per token.
    let r = route_ties(be, 2048, 64);
    if be.adapter_info().name.to_ascii_lowercase().contains("llvmpipe") {
        let e = r.expect_err("past the loop cap");
        assert!(matches!(e, MoeError::Unsupported { .. }), "{e}");
        println!("conformance llvmpipe loop cap: {e}");
    } else {
        assert_eq!(r.expect("route"), (0..64).collect::<Vec<i32>>());
    }
}
