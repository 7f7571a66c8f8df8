//! The golden conformance suite, the randomized property suite and a CUDA-graph replay test on
//! the CUDA backend. Without a CUDA driver or device each test prints why and passes.
//! `MOE_GOLDEN_DIR=<folder> cargo test -p moe-cuda --release conformance` runs another case set.

mod common;

use moe_core::DType;
use moe_core::config::*;
use moe_core::conformance::{
    ConformanceBackend, Rng, check_case, generated_case, golden_dir, load_dir, rel_err,
    rounded_case, run_golden_suite, run_property_suite,
};
use moe_cuda::GemmTuning;

#[test]
fn conformance_golden() {
    let Some(r) = common::runner("conformance_golden") else { return };
    match run_golden_suite(&r) {
        Ok(n) => println!("{n} golden checks passed"),
        Err(e) => panic!("{e}"),
    }
}

/// The tie / NaN selection policy: ids must equal the reference's exactly.
#[test]
fn conformance_rules() {
    let Some(r) = common::runner("conformance_rules") else { return };
    match moe_core::conformance::run_rules_suite(&r) {
        Ok(n) => println!("{n} rule checks passed"),
        Err(e) => panic!("{e}"),
    }
}

/// The golden cases again on every other GEMM kernel choice (`common::TUNINGS`: the simple,
/// pipelined and capped, decode, wgmma and wgmma-TMA kernels alone, and the combinations; the
/// wgmma kernels fall back to the pipelined one off compute capability 9.0 and for ineligible
/// shapes).
#[test]
fn conformance_golden_other_kernels() {
    // conformance_golden runs the default tuning
    for tuning in common::TUNINGS.into_iter().filter(|t| *t != GemmTuning::default()) {
        let Some(r) = common::runner_with("conformance_golden_other_kernels", tuning) else {
            return;
        };
        match run_golden_suite(&r) {
            Ok(n) => println!("{n} golden checks passed with {tuning:?}"),
            Err(e) => panic!("{tuning:?}: {e}"),
        }
    }
}

/// Larger layers than the golden and property cases (many K steps, several row and column
/// tiles per expert, token counts that are not tile multiples) against the float64 reference.
#[test]
fn conformance_larger_shapes() {
    for tuning in common::TUNINGS {
        let Some(r) = common::runner_with("conformance_larger_shapes", tuning) else { return };
        larger_shapes(&r);
    }
}

fn larger_shapes(r: &common::Runner) {
    let mut failed = Vec::new();
    for (i, config) in larger_configs().into_iter().enumerate() {
        let mut rng = Rng::new(77 + i as u64);
        let tokens = [300, 129, 200, 1][i % 4];
        let case = generated_case(&format!("larger-{i}"), config, tokens, &mut rng);
        for dtype in DType::ALL {
            let res = check_case(r, &rounded_case(&case, dtype), dtype);
            println!("{}", res.line);
            if !res.passed {
                failed.push(res.line);
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

fn larger_configs() -> Vec<MoeConfig> {
    let mlp = |i, gated, activation, bias| MlpConfig { intermediate: i, gated, activation, bias };
    let base = |h, e, k, expert_mlp| MoeConfig {
        hidden: h,
        experts: e,
        top_k: k,
        router: RouterConfig { reduce: TopkReduce::Sum { eps: 0.0 }, ..RouterConfig::default() },
        expert: ExpertConfig { mlp: expert_mlp, apply_weight_on_input: false },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    };
    let mut a = base(320, 16, 4, mlp(200, true, Activation::Silu, true));
    a.shared = Some(SharedConfig {
        mlp: mlp(136, true, Activation::Gelu, false),
        gate: SharedGate::SigmoidLinear,
    });
    let mut b = base(256, 8, 2, mlp(512, false, Activation::Relu2, false));
    b.latent = Some(LatentConfig { size: 96, bias: true });
    let mut c = base(512, 64, 6, mlp(128, true, Activation::Silu, false));
    c.router = RouterConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        groups: Some(GroupLimit { n_group: 8, topk_group: 4, score: GroupScore::Top2Sum }),
        reduce: TopkReduce::NOAUX_TC,
        scale: RoutedScale { factor: 2.5, placement: ScalePlacement::OnOutput },
        ..RouterConfig::default()
    };
    c.shared =
        Some(SharedConfig { mlp: mlp(256, true, Activation::Silu, false), gate: SharedGate::None });
    let mut d =
        base(384, 32, 4, mlp(384, true, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, true));
    d.router = RouterConfig {
        scoring: Scoring::None,
        bias: true,
        weights: WeightSource::SoftmaxTopkLogits,
        reduce: TopkReduce::None,
        ..RouterConfig::default()
    };
    d.expert.apply_weight_on_input = true;
    vec![a, b, c, d]
}

/// The decode GEMM (`GemmTuning::decode`) on decode shapes: T in {1, 2, 7, 16, 33}, K in
/// {1, 2, 8}, E in {8, 64}, H and I multiples of 8 but not of 64 (K tails of the 32-wide
/// step), gated and ungated, biases, the routing weight on the input and on the output, a
/// shared expert (dense decode GEMMs) on every other case; plus skewed routing (a router bias
/// sends every token to expert 0: several row passes and, at T = 200, two row chunks); the
/// narrow and wide strips (Mixtral-like few experts, and a grid wide enough to keep wide
/// strips; see `decode_configs`). bf16, f16, and f32 (which falls back to the tiled kernel) against the float64 reference.
#[test]
fn conformance_decode_shapes() {
    let tuning = GemmTuning { decode: true, ..GemmTuning::SIMPLE };
    let Some(r) = common::runner_with("conformance_decode_shapes", tuning) else { return };
    let mut failed = Vec::new();
    let mut n = 0;
    for (ci, (config, tokens, skew)) in decode_configs().into_iter().enumerate() {
        let mut rng = Rng::new(0xdec0 + ci as u64);
        let mut case = generated_case(&format!("decode-{ci}-t{tokens}"), config, tokens, &mut rng);
        if skew && let Some(b) = case.weights.router_bias.as_mut() {
            b[0] = 8.0;
        }
        for dtype in DType::ALL {
            let res = check_case(&r, &rounded_case(&case, dtype), dtype);
            n += 1;
            if !res.passed {
                println!("{}", res.line);
                failed.push(res.line);
            }
        }
    }
    println!("{} of {n} decode-shape checks passed", n - failed.len());
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The decode-shape cases are valid layers the reference runs (checked without a GPU too), and
/// the skewed ones really send every token to expert 0.
#[test]
fn decode_shapes_are_valid_cases() {
    for (ci, (config, tokens, skew)) in decode_configs().into_iter().enumerate() {
        config.validate().unwrap_or_else(|e| panic!("decode case {ci}: {e}"));
        if skew {
            let mut rng = Rng::new(1);
            let mut case = generated_case("skew", config, tokens, &mut rng);
            case.weights.router_bias.as_mut().expect("router bias")[0] = 8.0;
            let case = rounded_case(&case, DType::BF16);
            let k = config.top_k;
            assert!((0..tokens).all(|t| case.expected.topk_ids[t * k..(t + 1) * k].contains(&0)));
        }
    }
}

fn decode_configs() -> Vec<(MoeConfig, usize, bool)> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for &tokens in &[1usize, 2, 7, 16, 33] {
        for &top_k in &[1usize, 2, 8] {
            for &experts in &[8usize, 64] {
                let gated = i.is_multiple_of(2);
                let on_input = (i / 2).is_multiple_of(2);
                let (h, inter) = [(136, 200), (264, 72), (72, 328)][i % 3];
                let activation = if gated {
                    [Activation::Silu, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }][i % 2]
                } else {
                    [Activation::Gelu, Activation::Relu2][(i / 3) % 2]
                };
                let mut c = MoeConfig {
                    hidden: h,
                    experts,
                    top_k,
                    router: RouterConfig {
                        reduce: TopkReduce::Sum { eps: 0.0 },
                        ..RouterConfig::default()
                    },
                    expert: ExpertConfig {
                        mlp: MlpConfig { intermediate: inter, gated, activation, bias: true },
                        apply_weight_on_input: on_input,
                    },
                    shared: None,
                    latent: None,
                    parallel: ParallelConfig::default(),
                };
                if i % 2 == 1 {
                    c.shared = Some(SharedConfig {
                        mlp: MlpConfig {
                            intermediate: 120,
                            gated: true,
                            activation: Activation::Silu,
                            bias: false,
                        },
                        gate: SharedGate::SigmoidLinear,
                    });
                }
                out.push((c, tokens, false));
                i += 1;
            }
        }
    }
    // skewed: every token routes to expert 0 (router bias), top-1 and top-2
    for (tokens, top_k, experts, gated) in
        [(33usize, 1usize, 8usize, true), (33, 2, 64, false), (200, 1, 64, true), (16, 8, 64, true)]
    {
        let c = MoeConfig {
            hidden: 136,
            experts,
            top_k,
            router: RouterConfig {
                bias: true,
                reduce: TopkReduce::Sum { eps: 0.0 },
                ..RouterConfig::default()
            },
            expert: ExpertConfig {
                mlp: MlpConfig {
                    intermediate: 200,
                    gated,
                    activation: Activation::Silu,
                    bias: true,
                },
                apply_weight_on_input: false,
            },
            shared: None,
            latent: None,
            parallel: ParallelConfig::default(),
        };
        out.push((c, tokens, true));
    }
    // Strip widths of the decode kernel (launch::decode_narrow): few experts with a wide
    // intermediate (Mixtral-like: E = 8, top-2; narrow 16/32-feature strips at T = 1 and 16,
    // the wide NF = 8 kernel at T = 128), and enough wide blocks (64 experts with rows x 32
    // gated strips = 2048 >= 8 per SM on a GPU of up to 256 SMs) that the up projection keeps
    // the wide NF = 2 kernel while its down projection (3 strips) takes the narrow one.
    for (tokens, top_k, experts, hidden, inter) in [
        (1usize, 2usize, 8usize, 256usize, 1032usize),
        (16, 2, 8, 256, 1032),
        (128, 2, 8, 256, 1032),
        (16, 8, 64, 136, 1000),
    ] {
        // a plain gated-silu layer (softmax routing, no extras)
        let c = moe_core::conformance::edge_config(hidden, experts, top_k, inter);
        out.push((c, tokens, false));
    }
    out
}

#[test]
fn conformance_property() {
    for tuning in [GemmTuning::SIMPLE, GemmTuning::BEST] {
        let Some(r) = common::runner_with("conformance_property", tuning) else { return };
        match run_property_suite(&r, 60, 0x5eed) {
            Ok(n) => println!("{n} property checks passed with {tuning:?}"),
            Err(e) => panic!("{tuning:?}: {e}"),
        }
    }
}

/// Capture a whole forward of every golden case (bf16 and f32) into a CUDA graph, replay it
/// twice on a poisoned output, and require the result to be bitwise identical to a direct run.
#[test]
fn conformance_cuda_graph_replay() {
    for tuning in [
        GemmTuning::SIMPLE,
        GemmTuning::BEST,
        GemmTuning { wgmma_tma: false, ..GemmTuning::BEST },
        GemmTuning { wgmma_multicast: true, ..GemmTuning::BEST },
    ] {
        let Some(r) = common::runner_with("conformance_cuda_graph_replay", tuning) else {
            return;
        };
        let cases = load_dir(&golden_dir()).unwrap_or_else(|e| panic!("{e}"));
        for case in &cases {
            graph_case::<half::bf16>(&r, case);
            graph_case::<f32>(&r, case);
        }
    }
}

fn graph_case<T: moe_cuda::CudaElement>(r: &common::Runner, case: &moe_core::conformance::Case)
where
    moe_cuda::CudaBackend: moe_core::MoeStages<T>,
{
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let mut p = r.prepare::<T>(&case.config, &case.weights, &case.x, case.tokens).expect("prepare");
    r.forward(&mut p).expect("direct forward");
    let direct = r.read(&p).expect("read direct");
    r.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("begin capture");
    let fwd = r.forward(&mut p);
    let graph = r.stream.end_capture(CUgraphInstantiate_flags(0)).expect("end capture");
    fwd.expect("captured forward");
    let graph = graph.expect("a graph");
    for replay in 0..2 {
        r.poison(&mut p).expect("poison");
        graph.launch().expect("graph launch");
        let got = r.read(&p).expect("read replay");
        let same = got.out.len() == direct.out.len()
            && got.out.iter().zip(&direct.out).all(|(a, b)| a.to_bits() == b.to_bits())
            && got.topk_ids == direct.topk_ids;
        println!(
            "graph[cuda] {:<24} {:<4} replay {replay}: {} (rel diff {:.1e})",
            case.name,
            T::DTYPE.name(),
            if same { "bitwise identical" } else { "DIFFERENT" },
            rel_err(&got.out, &direct.out)
        );
        assert!(same, "graph replay differs from the direct run for {}", case.name);
    }
    let _ = (DType::BF16, r.name());
}

/// The wgmma kernel (`GemmTuning { wgmma: true, .. }`) on shapes that exercise it: many K
/// steps (H = 1024: 16 steps of 64), several M and N tiles per expert, a skewed routing (a
/// router bias sends nearly every token to expert 0, experts 5..7 get no rows at all),
/// partial N tiles, the gated and the ungated epilogue (bias, routing weight on the input),
/// and a dense shared-expert GEMM with a partial M tile; bf16 and f16 vs the float64
/// reference. Off compute capability 9.0 the same tuning falls back to the pipelined kernel
/// (the test still passes; the printed line says which).
#[test]
fn conformance_wgmma_shapes() {
    let tuning = GemmTuning { wgmma: true, ..GemmTuning::SIMPLE };
    let Some(r) = common::runner_with("conformance_wgmma_shapes", tuning) else { return };
    println!(
        "conformance_wgmma_shapes: wgmma kernel {}",
        if r.backend.wgmma_available() { "available (sm_90)" } else { "NOT available: fallback" }
    );
    wgmma_shapes(&r);
}

/// The same shapes on the TMA variant of the wgmma kernel (`GemmTuning { wgmma_tma: true, .. }`:
/// weights through TMA; A through TMA for GEMM2 and the dense shared-expert GEMMs, gathered
/// with cp.async for GEMM1; partial N tiles zero-filled by the TMA; paired epilogue stores).
#[test]
fn conformance_wgmma_tma_shapes() {
    let tuning = GemmTuning { wgmma_tma: true, ..GemmTuning::SIMPLE };
    let Some(r) = common::runner_with("conformance_wgmma_tma_shapes", tuning) else { return };
    println!(
        "conformance_wgmma_tma_shapes: TMA wgmma kernel {}",
        if r.backend.wgmma_tma_available() {
            "available (sm_90)"
        } else {
            "NOT available: fallback"
        }
    );
    wgmma_shapes(&r);
}

/// The same shapes on the clustered TMA kernel (`GemmTuning { wgmma_multicast: true, .. }`:
/// CTA pairs on adjacent M tiles share the weight tile by TMA multicast where both tiles
/// have rows of one expert; the skewed routing gives pairs that straddle two experts (no
/// multicast) and odd tile counts (a rank-1 CTA with no rows), the dense shared-expert
/// GEMM (M = 333: three M tiles) a pair with one empty tile).
#[test]
fn conformance_wgmma_mc_shapes() {
    let tuning = GemmTuning { wgmma_multicast: true, ..GemmTuning::SIMPLE };
    let Some(r) = common::runner_with("conformance_wgmma_mc_shapes", tuning) else { return };
    println!(
        "conformance_wgmma_mc_shapes: clustered TMA wgmma kernel {}",
        if r.backend.wgmma_multicast_available() {
            "available (sm_90)"
        } else {
            "NOT available: fallback"
        }
    );
    wgmma_shapes(&r);
}

fn wgmma_shapes(r: &common::Runner) {
    let mlp = |i, gated, activation, bias| MlpConfig { intermediate: i, gated, activation, bias };
    let base = |h, e, k, expert_mlp| MoeConfig {
        hidden: h,
        experts: e,
        top_k: k,
        router: RouterConfig {
            bias: true,
            reduce: TopkReduce::Sum { eps: 0.0 },
            ..RouterConfig::default()
        },
        expert: ExpertConfig { mlp: expert_mlp, apply_weight_on_input: false },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    };
    // gated: GEMM1 N = 640 (5 tiles of 128 gate + up columns), K = 1024; GEMM2 N = 1024
    // (4 tiles of 256), K = 640 (10 steps)
    let a = base(1024, 8, 2, mlp(640, true, Activation::Silu, false));
    // ungated with biases and the routing weight on the input; GEMM1 N = 1280 (5 tiles of
    // 256), GEMM2 N = 768 (3 tiles); a gated shared expert (dense GEMMs, M = 333)
    let mut b = base(768, 8, 2, mlp(1280, false, Activation::Gelu, true));
    b.expert.apply_weight_on_input = true;
    b.shared = Some(SharedConfig {
        mlp: mlp(384, true, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, false),
        gate: SharedGate::SigmoidLinear,
    });
    // partial N tiles: gated GEMM1 N = 704 (5.5 tiles of 128 gate + up columns), GEMM2
    // N = 1088 (4.25 tiles of 256), K = 704 (11 steps) and 1088 (17 steps)
    let c = base(1088, 8, 2, mlp(704, true, Activation::Silu, false));
    let mut failed = Vec::new();
    for (i, (config, tokens)) in [(a, 600usize), (b, 333), (c, 257)].into_iter().enumerate() {
        let mut rng = Rng::new(0x3090 + i as u64);
        let mut case = generated_case(&format!("wgmma-{i}"), config, tokens, &mut rng);
        // skew the routing: expert 0 gets (nearly) every token, experts 5..7 none
        let e = case.config.experts;
        case.weights.router_bias = Some(
            (0..e)
                .map(|j| {
                    if j == 0 {
                        6.0
                    } else if j >= 5 {
                        -40.0
                    } else {
                        0.0
                    }
                })
                .collect(),
        );
        for dtype in [DType::BF16, DType::F16] {
            let res = check_case(r, &rounded_case(&case, dtype), dtype);
            println!("{}", res.line);
            if !res.passed {
                failed.push(res.line);
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
