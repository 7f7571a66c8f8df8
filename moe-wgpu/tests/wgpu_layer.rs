//! The wgpu layer against the float64 reference on lavapipe (or any adapter), over recipes that
//! cover every routing mode, activation, bias, shared expert, latent and expert placement.
//! Every test skips (passes with a message) where no adapter exists.

mod common;

use common::{backend, run};
use moe_core::conformance;
use moe_core::reference::{self, HostLatent, HostMlp, HostShared, HostWeights};
use moe_core::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn mlp(r: &mut Rng, m: &MlpConfig, n: usize, width: usize, with_down_bias: bool) -> HostMlp {
    let i = m.intermediate;
    let s1 = 1.0 / (width as f64).sqrt();
    let s2 = 1.0 / (i as f64).sqrt();
    HostMlp {
        gate: m.gated.then(|| r.vec(n * i * width, s1)),
        up: r.vec(n * i * width, s1),
        down: r.vec(n * width * i, s2),
        gate_bias: (m.bias && m.gated).then(|| r.vec(n * i, 0.1)),
        up_bias: m.bias.then(|| r.vec(n * i, 0.1)),
        down_bias: (m.bias && with_down_bias).then(|| r.vec(n * width, 0.1)),
    }
}

fn weights(c: &MoeConfig, seed: u64) -> (HostWeights, Vec<f64>) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (h, e) = (c.hidden, c.experts);
    let d = c.expert_width();
    let mut w = HostWeights {
        router: r.vec(e * h, 2.0 / (h as f64).sqrt()),
        router_bias: c.router.bias.then(|| r.vec(e, 0.2)),
        selection_bias: c.router.selection_bias.then(|| r.vec(e, 0.05)),
        experts: mlp(&mut r, &c.expert.mlp, c.local_experts(), d, true),
        shared: c.shared.map(|s| HostShared {
            mlp: mlp(&mut r, &s.mlp, 1, h, true),
            gate: (s.gate == SharedGate::SigmoidLinear).then(|| r.vec(h, 1.0 / (h as f64).sqrt())),
        }),
        latent: c.latent.map(|l| HostLatent {
            fc1: r.vec(l.size * h, 1.0 / (h as f64).sqrt()),
            fc2: r.vec(h * l.size, 1.0 / (l.size as f64).sqrt()),
            fc1_bias: l.bias.then(|| r.vec(l.size, 0.1)),
            fc2_bias: l.bias.then(|| r.vec(h, 0.1)),
        }),
        expert_map: None,
    };
    if let Some(ep) = c.parallel.experts {
        // Global experts 1, 3, 5, ... live here (reversed), the rest elsewhere.
        let mut m = vec![-1; e];
        for j in 0..ep.local_experts {
            m[(2 * j + 1) % e] = (ep.local_experts - 1 - j) as i32;
        }
        w.expert_map = Some(m);
    }
    let tokens_x = r.vec(64 * h, 1.0);
    (w, tokens_x)
}

fn mlp_cfg(i: usize, gated: bool, activation: Activation, bias: bool) -> MlpConfig {
    MlpConfig { intermediate: i, gated, activation, bias }
}

fn base(h: usize, e: usize, k: usize, i: usize) -> MoeConfig {
    MoeConfig {
        hidden: h,
        experts: e,
        top_k: k,
        router: RouterConfig::default(),
        expert: ExpertConfig {
            mlp: mlp_cfg(i, true, Activation::Silu, false),
            apply_weight_on_input: false,
        },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    }
}

fn recipes() -> Vec<(&'static str, MoeConfig)> {
    let mut v = Vec::new();
    v.push(("mixtral_like", base(64, 8, 2, 48)));
    let mut c = base(40, 16, 4, 24);
    c.router.reduce = TopkReduce::None;
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(56, true, Activation::Silu, false),
        gate: SharedGate::SigmoidLinear,
    });
    v.push(("qwen2_shared_gate_like", c));
    let mut c = base(48, 32, 6, 20);
    c.router.scoring = Scoring::Sigmoid;
    c.router.selection_bias = true;
    c.router.groups = Some(GroupLimit { n_group: 8, topk_group: 3, score: GroupScore::Top2Sum });
    c.router.reduce = TopkReduce::NOAUX_TC;
    c.router.scale = RoutedScale { factor: 2.5, placement: ScalePlacement::OnWeights };
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(40, true, Activation::Silu, false),
        gate: SharedGate::None,
    });
    v.push(("deepseek_v3_like", c));
    c.router.groups = Some(GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Max });
    c.router.scale = RoutedScale { factor: 1.5, placement: ScalePlacement::OnOutput };
    v.push(("groups_max_scale_on_output", c));
    let mut c = base(36, 8, 4, 28);
    c.router.scoring = Scoring::None;
    c.router.bias = true;
    c.router.weights = WeightSource::SoftmaxTopkLogits;
    c.router.reduce = TopkReduce::None;
    c.expert.mlp = mlp_cfg(28, true, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, true);
    v.push(("gpt_oss_like", c));
    let mut c = base(32, 16, 1, 24);
    c.router.scoring = Scoring::None;
    c.router.weights = WeightSource::SigmoidTopkLogits;
    c.router.reduce = TopkReduce::None;
    c.expert.apply_weight_on_input = true;
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(24, true, Activation::Silu, false),
        gate: SharedGate::None,
    });
    v.push(("llama4_like", c));
    let mut c = base(48, 12, 3, 32);
    c.router.selection_bias = true;
    c.router.reduce = TopkReduce::ClampMin { min: 1e-12 };
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(32, true, Activation::Silu, false),
        gate: SharedGate::None,
    });
    v.push(("ernie_like", c));
    let mut c = base(48, 16, 4, 40);
    c.router.scoring = Scoring::Sigmoid;
    c.router.selection_bias = true;
    c.router.reduce = TopkReduce::NOAUX_TC;
    c.router.scale = RoutedScale { factor: 2.0, placement: ScalePlacement::OnOutput };
    c.expert.mlp = mlp_cfg(40, false, Activation::Relu2, false);
    c.latent = Some(LatentConfig { size: 24, bias: true });
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(36, false, Activation::Relu2, false),
        gate: SharedGate::None,
    });
    v.push(("nemotron_latent_like", c));
    let mut c2 = c;
    c2.latent = None;
    v.push(("nemotron_no_latent", c2));
    let mut c2 = c;
    c2.shared = None;
    v.push(("nemotron_latent_no_shared", c2));
    let mut c2 = c;
    c2.shared = None;
    c2.latent = Some(LatentConfig { size: 24, bias: false });
    v.push(("nemotron_latent_nobias_no_shared", c2));
    let mut c = base(40, 10, 3, 24);
    c.router.reduce = TopkReduce::PNorm { p: 3.0 };
    c.expert.mlp = mlp_cfg(24, true, Activation::Gelu, true);
    v.push(("pnorm_gelu_bias", c));
    let mut c = base(40, 10, 2, 24);
    c.expert.mlp = mlp_cfg(24, false, Activation::GeluTanh, true);
    v.push(("ungated_gelu_tanh_bias", c));
    let mut c = base(32, 12, 3, 20);
    c.parallel.experts = Some(ExpertPlacement { local_experts: 5, include_shared: true });
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(20, true, Activation::Silu, true),
        gate: SharedGate::SigmoidLinear,
    });
    v.push(("expert_parallel_map", c));
    v
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Check one run: ids equal where the reference margin is comfortable, weights close, and the
/// output within `tol` of the reference evaluated on the backend's own routing.
fn check(
    name: &str,
    dtype: DType,
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    t: usize,
    align: usize,
) {
    let Some(be) = backend() else { return };
    check_on(be, name, dtype, c, w, x, t, align)
}

#[allow(clippy::too_many_arguments)]
fn check_on(
    be: &moe_wgpu::WgpuBackend,
    name: &str,
    dtype: DType,
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    t: usize,
    align: usize,
) {
    if !be.supports(dtype) {
        eprintln!("conformance {name} {}: SKIP (unsupported on this adapter)", dtype.name());
        return;
    }
    let round = |v: f64| match dtype {
        DType::F32 => v as f32 as f64,
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
    };
    let xr: Vec<f64> = x.iter().map(|&v| round(v)).collect();
    // The reference runs on the weights rounded as the backend sees them.
    let w = &match dtype {
        DType::F32 => conformance::round_weights::<f32>(w),
        DType::F16 => conformance::round_weights::<half::f16>(w),
        DType::BF16 => conformance::round_weights::<half::bf16>(w),
    };
    let got = run(be, dtype, c, w, &xr, t, align).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(got.buffers_created_in_forward, 0, "{name}: a forward created buffers");
    let (routing, _) = reference::forward(c, w, &xr, t).expect("reference");
    let k = c.top_k;
    let margin_tol = if dtype == DType::F32 { 1e-4 } else { 6e-2 };
    let mut flips = 0;
    for tok in 0..t {
        let a = &got.topk_ids[tok * k..(tok + 1) * k];
        let b = &routing.topk_ids[tok * k..(tok + 1) * k];
        if a != b {
            assert!(
                routing.margin[tok] < margin_tol,
                "{name} {}: token {tok} ids {a:?} != reference {b:?} (margin {})",
                dtype.name(),
                routing.margin[tok]
            );
            flips += 1;
        }
    }
    // Reference weights and output for the backend's own routing.
    let mut ref_w = Vec::with_capacity(t * k);
    for tok in 0..t {
        let ids = &got.topk_ids[tok * k..(tok + 1) * k];
        ref_w.extend(reference::weights_for_ids(
            c,
            &routing.logits[tok * c.experts..(tok + 1) * c.experts],
            ids,
        ));
    }
    let werr = got.topk_weights.iter().zip(&ref_w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let wtol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
    assert!(werr <= wtol * c.weight_scale().abs().max(1.0), "{name}: weight error {werr}");
    let ref_out = reference::output_for_routing(c, w, &xr, t, &got.topk_ids, &ref_w)
        .expect("reference output");
    let err = rel_err(&got.out, &ref_out);
    let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
    println!(
        "conformance {name} {} tokens={t} row_align={align}: rel_err={err:.3e} (tol {tol:.0e}) max_weight_err={werr:.2e} routing_flips={flips}",
        dtype.name()
    );
    assert!(err <= tol, "{name} {}: relative error {err} > {tol}", dtype.name());
}

#[test]
fn conformance_recipes_f32() {
    for (i, (name, c)) in recipes().into_iter().enumerate() {
        let (w, x) = weights(&c, 7 + i as u64);
        let t = 37;
        check(name, DType::F32, &c, &w, &x[..t * c.hidden], t, 1);
    }
}

#[test]
fn conformance_recipes_f16() {
    for (i, (name, c)) in recipes().into_iter().enumerate() {
        let (w, x) = weights(&c, 7 + i as u64);
        let t = 29;
        check(name, DType::F16, &c, &w, &x[..t * c.hidden], t, 1);
    }
}

#[test]
fn conformance_recipes_bf16() {
    for (i, (name, c)) in recipes().into_iter().enumerate() {
        let (w, x) = weights(&c, 7 + i as u64);
        let t = 31;
        check(name, DType::BF16, &c, &w, &x[..t * c.hidden], t, 1);
    }
}

#[test]
fn conformance_recipes_packed_f16() {
    let Some(be) = common::packed_backend() else { return };
    for (i, (name, c)) in recipes().into_iter().enumerate() {
        let (w, x) = weights(&c, 7 + i as u64);
        let t = 29;
        check_on(be, name, DType::F16, &c, &w, &x[..t * c.hidden], t, 1);
    }
}

#[test]
fn conformance_row_align_and_token_counts() {
    let (_, c) = recipes().into_iter().nth(2).expect("deepseek recipe");
    let (w, x) = weights(&c, 99);
    for (t, align) in [(1, 1), (3, 16), (64, 16), (17, 4)] {
        check("deepseek_v3_like", DType::F32, &c, &w, &x[..t * c.hidden], t, align);
    }
}

/// Every recipe in every element type, the decode and row-align cases, with the expert GEMMs'
/// decode variant forced (f16 also packed), at token counts where the automatic choice would
/// take either variant.
#[test]
fn conformance_recipes_decode_gemm() {
    for packed in [false, true] {
        let Some(be) = common::decode_backend(packed) else { return };
        for (i, (name, c)) in recipes().into_iter().enumerate() {
            let (w, x) = weights(&c, 7 + i as u64);
            for (dtype, t) in [(DType::F32, 37), (DType::F16, 5), (DType::BF16, 1)] {
                if packed && dtype != DType::F16 {
                    continue;
                }
                check_on(be, name, dtype, &c, &w, &x[..t * c.hidden], t, 1);
            }
        }
    }
    let Some(be) = common::decode_backend(false) else { return };
    let (_, c) = recipes().into_iter().nth(2).expect("deepseek recipe");
    let (w, x) = weights(&c, 99);
    for (t, align) in [(1, 1), (3, 16), (64, 16), (17, 4)] {
        check_on(be, "deepseek_v3_like", DType::BF16, &c, &w, &x[..t * c.hidden], t, align);
    }
    assert!(be.decode_gemm_dispatches() > 0, "the decode variant never ran");
    assert!(be.gemv_dispatches() > 0, "the few-row GEMM never ran");
    // The scalar decode variant at the same points.
    let Some(be) = common::scalar_decode_backend() else { return };
    for (i, (name, c)) in recipes().into_iter().enumerate() {
        let (w, x) = weights(&c, 7 + i as u64);
        for (dtype, t) in [(DType::F32, 37), (DType::F16, 5), (DType::BF16, 1)] {
            check_on(be, name, dtype, &c, &w, &x[..t * c.hidden], t, 1);
        }
    }
}

/// The automatic choice takes the decode variant at one token and the tiled one at many.
#[test]
fn expert_gemm_automatic_choice() {
    let Some(be) = common::tiled_backend() else { return };
    let Some(auto) = backend() else { return };
    let (_, c) = recipes().into_iter().nth(2).expect("deepseek recipe");
    let (w, x) = weights(&c, 5);
    check_on(be, "deepseek_v3_like tiled", DType::F32, &c, &w, &x[..c.hidden], 1, 1);
    assert_eq!(be.decode_gemm_dispatches(), 0, "ExpertGemm::Tiled ran the decode variant");
    // Other tests share `auto`: count only increases, so a 1-token forward must add some.
    let before = auto.decode_gemm_dispatches();
    check_on(auto, "deepseek_v3_like auto", DType::F32, &c, &w, &x[..c.hidden], 1, 1);
    assert!(auto.decode_gemm_dispatches() >= before + 2, "auto did not take decode at T=1");
    // Aligned shapes at one token: the few-row GEMM for the router and both expert GEMMs.
    let before = auto.gemv_dispatches();
    check_on(auto, "deepseek_v3_like auto", DType::BF16, &c, &w, &x[..c.hidden], 1, 1);
    assert!(auto.gemv_dispatches() >= before + 3, "auto did not take the few-row GEMM at T=1");
}

#[test]
fn conformance_custom_reduce_is_unsupported() {
    let Some(be) = backend() else { return };
    fn halve(w: &mut [f32]) {
        w.iter_mut().for_each(|v| *v *= 0.5);
    }
    let mut c = base(16, 4, 2, 8);
    c.router.reduce = TopkReduce::Custom(CustomReduce { name: "halve", func: halve });
    let (w, x) = weights(&c, 3);
    let e = run(be, DType::F32, &c, &w, &x[..2 * 16], 2, 1).expect_err("custom reduce must fail");
    assert!(matches!(e, MoeError::Unsupported { .. }), "{e}");
}

#[test]
fn conformance_repeated_forwards_are_bitwise_identical() {
    let Some(be) = backend() else { return };
    // 2 x 256 forwards of ~12 dispatches wrap the 4096-slot parameter ring.
    for (name, c) in recipes()
        .into_iter()
        .filter(|(n, _)| *n == "nemotron_latent_like" || *n == "qwen2_shared_gate_like")
    {
        let (w, x) = weights(&c, 5);
        let t = 33;
        let first = run(be, DType::F32, &c, &w, &x[..t * c.hidden], t, 1).expect("run");
        for i in 0..255 {
            let again = run(be, DType::F32, &c, &w, &x[..t * c.hidden], t, 1).expect("run");
            assert_eq!(again.topk_ids, first.topk_ids, "{name}: run {i}");
            let same = again.out.iter().zip(&first.out).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: run {i} differs");
        }
        println!("conformance {name} f32: 256 forwards bitwise identical");
    }
}

#[test]
fn conformance_threads_sharing_one_backend() {
    let Some(be) = backend() else { return };
    let (_, c) = recipes().into_iter().next().expect("recipe");
    let (w, x) = weights(&c, 11);
    let t = 21;
    let x = &x[..t * c.hidden];
    let want = run(be, DType::F32, &c, &w, x, t, 1).expect("run");
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..8)
                        .map(|_| run(be, DType::F32, &c, &w, x, t, 1).expect("run").out)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in hs {
            for out in h.join().expect("thread") {
                assert!(out.iter().zip(&want.out).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    });
    println!("conformance threads f32: 4 threads x 8 forwards bitwise identical");
}

#[test]
fn conformance_views_at_unaligned_offsets() {
    // Every tensor, the output and the workspace start `pad` bytes into their buffers.
    for pad in [4usize, 6, 260] {
        common::PAD.with(|p| p.set(pad));
        for (i, (name, c)) in recipes().into_iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            let (w, x) = weights(&c, 70 + i as u64);
            let t = 13;
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                if pad % dtype.size_bytes() != 0 {
                    continue;
                }
                check(&format!("{name}+pad{pad}"), dtype, &c, &w, &x[..t * c.hidden], t, 1);
            }
        }
        common::PAD.with(|p| p.set(0));
    }
}

#[test]
fn conformance_buffer_without_storage_usage_is_a_typed_error() {
    let Some(be) = backend() else { return };
    let plain = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("no storage"),
        size: 1024,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let ok = common::upload_f32(be, &[1.0; 64]);
    let v = moe_wgpu::WgpuView::<f32>::new(&plain, 0, 64).expect("view");
    let out = moe_wgpu::WgpuViewMut::<f32>::new(&ok.buf, 0, 64).expect("view");
    let e = MoeStages::<f32>::add_assign(be, out, v).expect_err("no STORAGE usage");
    assert!(matches!(e, MoeError::Unsupported { .. }), "{e}");
    assert!(moe_wgpu::WgpuView::<f32>::new(&plain, 0, 257).is_err(), "past the end");
    assert!(moe_wgpu::WgpuView::<f32>::new(&plain, 2, 4).is_err(), "unaligned element");
}

#[test]
fn conformance_wgpu_validation_error_is_a_typed_error() {
    let Some(be) = backend() else { return };
    // A buffer still mapped cannot be used by a submission: wgpu raises a validation error,
    // which the stage returns as MoeError::Device instead of panicking.
    let mapped = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("still mapped"),
        size: 256,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: true,
    });
    let ok = common::upload_f32(be, &[1.0; 64]);
    let src = moe_wgpu::WgpuView::<f32>::new(&mapped, 0, 64).expect("view");
    let dst = moe_wgpu::WgpuViewMut::<f32>::new(&ok.buf, 0, 64).expect("view");
    let e = MoeStages::<f32>::add_assign(be, dst, src).expect_err("mapped buffer");
    assert!(matches!(e, MoeError::Device { .. }), "{e}");
    // The backend still works afterwards.
    let dst = moe_wgpu::WgpuViewMut::<f32>::new(&ok.buf, 0, 64).expect("view");
    let src2 = common::upload_f32(be, &[2.0; 64]);
    MoeStages::<f32>::add_assign(be, dst, src2.view()).expect("add");
    be.synchronize().expect("sync");
    assert!(common::read::<f32>(be, &ok.buf, 0, 64).iter().all(|&v| v == 3.0));
}

/// Few-row expert GEMMs whose grid has fewer z workgroups than experts (at most `tokens *
/// top_k` experts have rows; each workgroup finds its expert by a scan of the offsets): more
/// experts than the scan's 256 invocations, biases and the clamped activation, expert
/// placement, row padding; K and I multiples of 8 so that every expert GEMM takes the few-row
/// GEMM in every element type.
#[test]
fn conformance_few_row_gemm_over_active_experts() {
    let Some(be) = common::decode_backend(false) else { return };
    let mut cases = Vec::new();
    cases.push(("many_experts", base(64, 300, 2, 32)));
    let mut c = base(64, 40, 4, 48);
    c.router.scoring = Scoring::None;
    c.router.bias = true;
    c.router.weights = WeightSource::SoftmaxTopkLogits;
    c.router.reduce = TopkReduce::None;
    c.expert.mlp = mlp_cfg(48, true, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, true);
    cases.push(("gpt_oss_like_wide", c));
    let mut c = base(32, 24, 3, 16);
    c.parallel.experts = Some(ExpertPlacement { local_experts: 10, include_shared: false });
    cases.push(("expert_parallel_wide", c));
    for (i, (name, c)) in cases.into_iter().enumerate() {
        let (w, x) = weights(&c, 41 + i as u64);
        for (dtype, t, align) in [
            (DType::BF16, 1, 1),
            (DType::F32, 1, 1),
            (DType::F16, 2, 1),
            (DType::BF16, 3, 16),
            (DType::F32, 5, 4),
        ] {
            let before = be.gemv_dispatches();
            check_on(be, name, dtype, &c, &w, &x[..t * c.hidden], t, align);
            if be.supports(dtype) {
                assert!(be.gemv_dispatches() >= before + 2, "{name}: the few-row GEMM did not run");
            }
        }
    }
}

/// Both kernels of the few-row GEMM (`stream`, the default, and `main`) against the reference
/// where K is long enough for 64-256 lanes per output feature (up: K = hidden, down: K =
/// intermediate; f32 and bf16), K not a multiple of a step (the clamped tail words), and 1, 5
/// and 37 tokens (the `stream` kernel's blocks of 1, 4 and 8 rows, several blocks per expert),
/// each run twice with bitwise-equal outputs.
#[test]
fn conformance_few_row_kernels_long_k() {
    let backends =
        [("stream", common::decode_backend(false)), ("resident", common::resident_backend())];
    let mut cases = Vec::new();
    // down: f32 K = 8232 (2058 words: 256 lanes), bf16 1029 words (128 lanes)
    let mut c = base(64, 4, 2, 8232);
    c.expert.mlp = mlp_cfg(8232, true, Activation::Silu, true);
    cases.push(("long_down_k", c));
    // up: f32 K = 2056 (514 words: 64 lanes), bf16 257 words (32 lanes); ungated gelu
    let mut c = base(2056, 3, 2, 40);
    c.expert.mlp = mlp_cfg(40, false, Activation::Gelu, false);
    c.shared = Some(SharedConfig {
        mlp: mlp_cfg(24, true, Activation::Silu, false),
        gate: SharedGate::SigmoidLinear,
    });
    cases.push(("long_up_k", c));
    for (i, (name, c)) in cases.into_iter().enumerate() {
        let (w, x) = weights(&c, 77 + i as u64);
        for (kernel, be) in backends {
            let Some(be) = be else { return };
            for (dtype, t) in
                [(DType::F32, 1), (DType::BF16, 5), (DType::F32, 37), (DType::BF16, 1)]
            {
                let before = be.gemv_dispatches();
                check_on(be, name, dtype, &c, &w, &x[..t * c.hidden], t, 1);
                assert!(be.gemv_dispatches() >= before + 2, "{name} {kernel}: no few-row GEMM");
                let xr = &x[..t * c.hidden];
                let a = run(be, dtype, &c, &w, xr, t, 1).expect("first run");
                let b = run(be, dtype, &c, &w, xr, t, 1).expect("second run");
                assert!(
                    a.out.iter().zip(&b.out).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{name} {kernel} {}: two runs differ",
                    dtype.name()
                );
            }
        }
    }
}

/// Stage timestamps: one per submission of a forward where the device has `TIMESTAMP_QUERY`,
/// none (and `false`) otherwise.
#[test]
fn stage_timestamps_cover_each_stage() {
    let be = match moe_wgpu::WgpuBackend::request_with_features(
        moe_wgpu::Options::default(),
        wgpu::Features::TIMESTAMP_QUERY,
    ) {
        Ok(Some(b)) => b,
        _ => return,
    };
    let (_, c) = recipes().into_iter().nth(2).expect("deepseek recipe");
    let (w, x) = weights(&c, 3);
    let on = be.begin_stage_timestamps(64);
    assert_eq!(on, be.device().features().contains(wgpu::Features::TIMESTAMP_QUERY));
    let (before, stages_before) = (be.submits(), be.stages());
    check_on(&be, "deepseek_v3_like timed", DType::F32, &c, &w, &x[..2 * c.hidden], 2, 1);
    let submits = be.submits() - before;
    let stages = be.stages() - stages_before;
    // the forward's stages are recorded into one encoder and submitted once
    assert_eq!(submits, 1, "one submission per forward");
    assert!(stages >= 6, "{stages} stages");
    let st = be.end_stage_timestamps().expect("stage timestamps");
    if !on {
        assert!(st.is_empty());
        return;
    }
    assert_eq!(st.len(), stages, "one time per stage");
    assert!(st.iter().any(|s| s.label == "route") && st.iter().any(|s| s.label == "permute"));
    for s in &st {
        assert!(s.gpu_ns.is_finite() && s.gpu_ns >= 0.0 && s.start_ns >= 0.0, "{s:?}");
    }
    // A second call records nothing more.
    assert!(be.end_stage_timestamps().expect("empty").is_empty());
}
