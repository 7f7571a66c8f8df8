//! Times the whole layer and each stage of the CUDA backend on the canonical shapes (bf16),
//! with CUDA events, and measures the GPU's copy bandwidth and bf16 matmul rate in the same run
//! to report each layer time against its floor:
//!
//! * bytes = distinct experts touched x 3 H I x 2 + shared 3 H Is x 2 + 2 T H x 2
//! * flops = 2 T K 3 H I (+ 2 T 3 H Is for a shared expert)
//! * floor = max(bytes / copy bandwidth, flops / matmul rate)
//!
//! Usage: `bench [--models qwen3,gpt-oss,mixtral,deepseek] [--tokens 1,16,128,1024,4096,16384]
//! [--csv FILE] [--tuning simple|pipelined|pipelined-capped|wgmma|wgmma-tma|decode|best|best-cp|best-mc|wgmma-mc]
//! [--decode]
//! [--kernel-tokens 1,16,128,4096,16384]`. `--tuning` picks the GEMM kernels of the whole-layer
//! table (`--decode` = `--tuning decode`; `best` = `GemmTuning::BEST`). The `kernels ...` lines
//! compare the GEMM kernels at the `--kernel-tokens` counts.
//! Prints a skip message and exits 0 without a CUDA driver or device.
#![allow(missing_docs)]

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moe_core::backend::{ExpertRows, MlpWeights, MoeStages, PermuteBuffers, split_workspace};
use moe_core::config::*;
use moe_core::{MoePlan, MoeWeights, SharedWeights, SingleRank};
use moe_cuda::{CudaBackend, DevView, DevViewMut, GemmTuning};
use std::io::Write;
use std::sync::Arc;

type R<T> = Result<T, Box<dyn std::error::Error>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.next() * scale * 1.7)).collect()
    }
}

struct Model {
    name: &'static str,
    config: MoeConfig,
}

fn mlp(i: usize, act: Activation, bias: bool) -> MlpConfig {
    MlpConfig { intermediate: i, gated: true, activation: act, bias }
}

fn models() -> Vec<Model> {
    let base = |h, e, k, i, router: RouterConfig, act, bias| MoeConfig {
        hidden: h,
        experts: e,
        top_k: k,
        router,
        expert: ExpertConfig { mlp: mlp(i, act, bias), apply_weight_on_input: false },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    };
    let softmax = RouterConfig { reduce: TopkReduce::Sum { eps: 0.0 }, ..RouterConfig::default() };
    let mut ds = base(
        7168,
        256,
        8,
        2048,
        RouterConfig {
            scoring: Scoring::Sigmoid,
            selection_bias: true,
            groups: Some(GroupLimit { n_group: 8, topk_group: 4, score: GroupScore::Top2Sum }),
            reduce: TopkReduce::NOAUX_TC,
            scale: RoutedScale { factor: 2.5, placement: ScalePlacement::OnOutput },
            ..RouterConfig::default()
        },
        Activation::Silu,
        false,
    );
    ds.shared =
        Some(SharedConfig { mlp: mlp(2048, Activation::Silu, false), gate: SharedGate::None });
    vec![
        Model {
            name: "qwen3-30b-a3b",
            config: base(2048, 128, 8, 768, softmax, Activation::Silu, false),
        },
        Model {
            name: "gpt-oss-120b",
            config: base(
                2880,
                128,
                4,
                2880,
                RouterConfig {
                    scoring: Scoring::None,
                    bias: true,
                    weights: WeightSource::SoftmaxTopkLogits,
                    reduce: TopkReduce::None,
                    ..RouterConfig::default()
                },
                Activation::SwigluOai { alpha: 1.702, limit: 7.0 },
                true,
            ),
        },
        Model {
            name: "mixtral-8x7b",
            config: base(4096, 8, 2, 14336, softmax, Activation::Silu, false),
        },
        Model { name: "deepseek-v3", config: ds },
    ]
}

/// Device tensors filled by tiling one random host chunk (never zeros).
struct Filler {
    chunk: CudaSlice<bf16>,
}

impl Filler {
    fn new(s: &Arc<CudaStream>, rng: &mut Rng) -> R<Filler> {
        let host = rng.vec((1 << 24) + 7, 1.0);
        Ok(Filler { chunk: s.clone_htod(&host)? })
    }
    /// n elements, values uniform in about +-1.7 * scale (scale applied by a host chunk copy).
    fn tensor(
        &self,
        s: &Arc<CudaStream>,
        n: usize,
        scale: f32,
        rng: &mut Rng,
    ) -> R<CudaSlice<bf16>> {
        let mut scaled = self.chunk.clone();
        if scale != 1.0 {
            let host: Vec<bf16> = rng.vec(self.chunk.len(), scale);
            s.memcpy_htod(&host, &mut scaled)?;
        }
        let mut d = s.alloc_zeros::<bf16>(n.max(1))?;
        let mut at = 0;
        while at < n {
            let len = (n - at).min(scaled.len());
            s.memcpy_dtod(&scaled.slice(0..len), &mut d.slice_mut(at..at + len))?;
            at += len;
        }
        Ok(d)
    }
}

struct Timer {
    stream: Arc<CudaStream>,
}

impl Timer {
    /// Median over 3 rounds of the mean time of `iters` calls of `f`, in ms.
    fn time(&self, iters: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
        f()?;
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let a = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            for _ in 0..iters {
                f()?;
            }
            let b = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            b.synchronize()?;
            rounds.push(a.elapsed_ms(&b)? as f64 / iters as f64);
        }
        rounds.sort_by(|a, b| a.total_cmp(b));
        Ok(rounds[1])
    }
}

fn copy_bandwidth(s: &Arc<CudaStream>, t: &Timer) -> R<f64> {
    let n = 1usize << 31;
    let a = s.alloc_zeros::<u8>(n)?;
    let mut b = s.alloc_zeros::<u8>(n)?;
    let ms = t.time(10, || Ok(s.memcpy_dtod(&a, &mut b)?))?;
    Ok(2.0 * n as f64 / (ms * 1e-3))
}

fn cublas_rate(s: &Arc<CudaStream>, t: &Timer, f: &Filler, rng: &mut Rng) -> R<f64> {
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
    let n = 8192usize;
    let a = f.tensor(s, n * n, 1.0, rng)?;
    let b = f.tensor(s, n * n, 1.0, rng)?;
    let mut c = s.alloc_zeros::<bf16>(n * n)?;
    let blas = std::panic::catch_unwind(|| CudaBlas::new(s.clone()))
        .map_err(|_| "cuBLAS library not found")??;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: bf16::ONE,
        lda: n as i32,
        ldb: n as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    // SAFETY: a, b, c hold n x n bf16 each, matching the leading dimensions.
    let ms = t.time(10, || Ok(unsafe { blas.gemm(cfg, &a, &b, &mut c) }?))?;
    Ok(2.0 * (n as f64).powi(3) / (ms * 1e-3))
}

fn own_gemm_rate(
    be: &CudaBackend,
    s: &Arc<CudaStream>,
    t: &Timer,
    f: &Filler,
    rng: &mut Rng,
) -> R<f64> {
    let n = 8192usize;
    let x = f.tensor(s, n * n, 1.0, rng)?;
    let w = f.tensor(s, n * n, 0.01, rng)?;
    let mut y = s.alloc_zeros::<bf16>(n * n)?;
    let ms = t.time(5, || {
        Ok(MoeStages::<bf16>::linear(
            be,
            n,
            n,
            n,
            DevView::of(&x),
            DevView::of(&w),
            None,
            None,
            1.0,
            false,
            DevViewMut::of(&mut y),
        )?)
    })?;
    Ok(2.0 * (n as f64).powi(3) / (ms * 1e-3))
}

struct Weights {
    router: CudaSlice<bf16>,
    router_bias: Option<CudaSlice<bf16>>,
    selection_bias: Option<CudaSlice<f32>>,
    gate: CudaSlice<bf16>,
    up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
    bias: Option<(CudaSlice<bf16>, CudaSlice<bf16>, CudaSlice<bf16>)>,
    shared: Option<(CudaSlice<bf16>, CudaSlice<bf16>, CudaSlice<bf16>)>,
}

fn weights(c: &MoeConfig, s: &Arc<CudaStream>, f: &Filler, rng: &mut Rng) -> R<Weights> {
    let (h, e, i) = (c.hidden, c.experts, c.local_intermediate());
    let (sh, si) = (1.0 / (h as f32).sqrt(), 1.0 / (i as f32).sqrt());
    let router = s.clone_htod(&rng.vec(e * h, sh))?;
    let router_bias = if c.router.bias { Some(s.clone_htod(&rng.vec(e, 0.1))?) } else { None };
    let selection_bias = if c.router.selection_bias {
        let v: Vec<f32> = (0..e).map(|_| rng.next() * 0.01).collect();
        Some(s.clone_htod(&v)?)
    } else {
        None
    };
    let bias = if c.expert.mlp.bias {
        Some((
            s.clone_htod(&rng.vec(e * i, 0.1))?,
            s.clone_htod(&rng.vec(e * i, 0.1))?,
            s.clone_htod(&rng.vec(e * h, 0.1))?,
        ))
    } else {
        None
    };
    let shared = match c.shared {
        Some(sc) => {
            let is = sc.mlp.intermediate;
            Some((
                f.tensor(s, is * h, sh, rng)?,
                f.tensor(s, is * h, sh, rng)?,
                f.tensor(s, h * is, 1.0 / (is as f32).sqrt(), rng)?,
            ))
        }
        None => None,
    };
    Ok(Weights {
        router,
        router_bias,
        selection_bias,
        gate: f.tensor(s, e * i * h, sh, rng)?,
        up: f.tensor(s, e * i * h, sh, rng)?,
        down: f.tensor(s, e * h * i, si, rng)?,
        bias,
        shared,
    })
}

fn mlp_views(w: &Weights) -> MlpWeights<'_, CudaBackend, bf16> {
    MlpWeights {
        gate: Some(DevView::of(&w.gate)),
        up: DevView::of(&w.up),
        down: DevView::of(&w.down),
        gate_bias: w.bias.as_ref().map(|b| DevView::of(&b.0)),
        up_bias: w.bias.as_ref().map(|b| DevView::of(&b.1)),
        down_bias: w.bias.as_ref().map(|b| DevView::of(&b.2)),
    }
}

fn views(w: &Weights) -> MoeWeights<'_, CudaBackend, bf16> {
    MoeWeights {
        router: DevView::of(&w.router),
        router_bias: w.router_bias.as_ref().map(DevView::of),
        selection_bias: w.selection_bias.as_ref().map(DevView::of),
        experts: mlp_views(w),
        shared: w.shared.as_ref().map(|(g, u, d)| SharedWeights {
            mlp: MlpWeights {
                gate: Some(DevView::of(g)),
                up: DevView::of(u),
                down: DevView::of(d),
                gate_bias: None,
                up_bias: None,
                down_bias: None,
            },
            gate: None,
        }),
        latent: None,
        expert_map: None,
    }
}

struct Row {
    model: &'static str,
    tokens: usize,
    graph_ms: f64,
    direct_ms: f64,
    tflops: f64,
    gbs: f64,
    floor_ms: f64,
    experts_touched: usize,
    stages: Vec<(&'static str, f64)>,
}

#[allow(clippy::too_many_arguments)]
fn bench_tokens(
    be: &CudaBackend,
    s: &Arc<CudaStream>,
    timer: &Timer,
    m: &Model,
    plan: &MoePlan,
    w: &Weights,
    x: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    ws: &mut CudaSlice<u8>,
    tokens: usize,
    bw: f64,
    rate: f64,
    with_stages: bool,
) -> R<Row> {
    let c = &m.config;
    let (h, k, i, e) = (c.hidden, c.top_k, c.local_intermediate(), c.experts);
    let wv = views(w);
    let xv = DevView::of(x).prefix(tokens * h);
    let fwd = |out: &mut CudaSlice<bf16>, ws: &mut CudaSlice<u8>| -> R<()> {
        moe_core::forward(
            be,
            plan,
            &wv,
            tokens,
            xv,
            DevViewMut::of(out).prefix(tokens * h),
            DevViewMut::of(ws),
            &SingleRank,
        )?;
        Ok(())
    };
    fwd(out, ws)?;
    s.synchronize()?;
    // distinct experts touched, from the routing in the workspace
    let layout = plan.layout(moe_core::DType::BF16)?;
    let bytes: Vec<u8> = s.clone_dtoh(ws)?;
    let base = (256 - DevView::of(ws).device_ptr() as usize % 256) % 256 + layout.topk_ids.offset;
    let mut seen = vec![false; e];
    for j in 0..tokens * k {
        let a = base + 4 * j;
        let id = i32::from_le_bytes([bytes[a], bytes[a + 1], bytes[a + 2], bytes[a + 3]]);
        if id >= 0 {
            seen[id as usize] = true;
        }
    }
    let touched = seen.iter().filter(|&&b| b).count();
    let is = c.shared_local_intermediate();
    let flops = 2.0 * tokens as f64 * k as f64 * 3.0 * h as f64 * i as f64
        + 2.0 * tokens as f64 * 3.0 * h as f64 * is as f64;
    let bytes_moved = touched as f64 * 3.0 * h as f64 * i as f64 * 2.0
        + 3.0 * h as f64 * is as f64 * 2.0
        + 2.0 * tokens as f64 * h as f64 * 2.0;
    let floor_s = (bytes_moved / bw).max(flops / rate);
    let iters = ((0.2 / floor_s.max(1e-6)) as usize).clamp(3, 200);

    let direct_ms = timer.time(iters, || fwd(out, ws))?;
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let r = fwd(out, ws);
    let graph = s.end_capture(CUgraphInstantiate_flags(0))?;
    r?;
    let graph = graph.ok_or("empty graph")?;
    let graph_ms = timer.time(iters, || Ok(graph.launch()?))?;

    // stages, each repeated on the workspace the forward left behind
    let mut stages = Vec::new();
    let secs = graph_ms * 1e-3;
    let row = |stages| Row {
        model: m.name,
        tokens,
        graph_ms,
        direct_ms,
        tflops: flops / secs / 1e12,
        gbs: bytes_moved / secs / 1e9,
        floor_ms: floor_s * 1e3,
        experts_touched: touched,
        stages,
    };
    if !with_stages {
        return Ok(row(stages));
    }
    let sc = split_workspace::<CudaBackend, bf16>(&layout, DevViewMut::of(ws))?;
    let moe_core::backend::Scratch {
        mut logits,
        mut topk_ids,
        mut topk_weights,
        mut route_scratch,
        mut expert_offsets,
        mut expert_cursor,
        mut sorted_slots,
        mut slot_rows,
        mut hidden,
        mut expert_out,
        mut shared_hidden,
        ..
    } = sc;
    type B = CudaBackend;
    let st = |v: &str| -> &'static str { Box::leak(v.to_string().into_boxed_str()) };
    stages.push((
        st("logits"),
        timer.time(iters, || {
            Ok(MoeStages::<bf16>::router_logits(
                be,
                tokens,
                h,
                e,
                xv,
                wv.router,
                wv.router_bias,
                B::reborrow(&mut logits),
            )?)
        })?,
    ));
    stages.push((
        st("route"),
        timer.time(iters, || {
            Ok(MoeStages::<bf16>::route(
                be,
                c,
                tokens,
                <B as moe_core::Backend>::as_view(&logits),
                wv.selection_bias,
                B::reborrow(&mut route_scratch),
                B::reborrow(&mut topk_ids),
                B::reborrow(&mut topk_weights),
            )?)
        })?,
    ));
    stages.push((
        st("permute"),
        timer.time(iters, || {
            Ok(MoeStages::<bf16>::permute(
                be,
                plan,
                tokens,
                <B as moe_core::Backend>::as_view(&topk_ids),
                None,
                PermuteBuffers {
                    expert_offsets: B::reborrow(&mut expert_offsets),
                    expert_cursor: B::reborrow(&mut expert_cursor),
                    sorted_slots: B::reborrow(&mut sorted_slots),
                    slot_rows: B::reborrow(&mut slot_rows),
                },
            )?)
        })?,
    ));
    use moe_core::Backend as _;
    stages.push((
        st("expert_up"),
        timer.time(iters, || {
            let rows = ExpertRows::<B> {
                expert_offsets: B::as_view(&expert_offsets),
                sorted_slots: B::as_view(&sorted_slots),
                weights: None,
            };
            Ok(MoeStages::<bf16>::expert_up(
                be,
                plan,
                tokens,
                xv,
                &wv.experts,
                rows,
                B::reborrow(&mut hidden),
            )?)
        })?,
    ));
    stages.push((
        st("expert_down"),
        timer.time(iters, || {
            let rows = ExpertRows::<B> {
                expert_offsets: B::as_view(&expert_offsets),
                sorted_slots: B::as_view(&sorted_slots),
                weights: Some(B::as_view(&topk_weights)),
            };
            Ok(MoeStages::<bf16>::expert_down(
                be,
                plan,
                tokens,
                B::as_view(&hidden),
                &wv.experts,
                rows,
                B::reborrow(&mut expert_out),
            )?)
        })?,
    ));
    stages.push((
        st("combine"),
        timer.time(iters, || {
            Ok(MoeStages::<bf16>::combine(
                be,
                plan,
                tokens,
                h,
                B::as_view(&expert_out),
                B::as_view(&slot_rows),
                1.0,
                DevViewMut::of(out).prefix(tokens * h),
            )?)
        })?,
    ));
    if let (Some(scfg), Some(sw)) = (&c.shared, &wv.shared) {
        stages.push((
            st("shared"),
            timer.time(iters, || {
                MoeStages::<bf16>::mlp_up(
                    be,
                    &scfg.mlp,
                    tokens,
                    h,
                    is,
                    xv,
                    &sw.mlp,
                    B::reborrow(&mut shared_hidden),
                )?;
                Ok(MoeStages::<bf16>::linear(
                    be,
                    tokens,
                    is,
                    h,
                    B::as_view(&shared_hidden),
                    sw.mlp.down,
                    None,
                    None,
                    1.0,
                    true,
                    DevViewMut::of(out).prefix(tokens * h),
                )?)
            })?,
        ));
    }
    Ok(row(stages))
}

/// The GEMM kernel choices by the names `--tuning` and the comparison lines use.
fn tuning_by_name(name: &str) -> Option<GemmTuning> {
    let simple = GemmTuning::SIMPLE;
    Some(match name {
        "simple" => simple,
        "pipelined" => GemmTuning { pipelined: true, ..simple },
        "pipelined-capped" => GemmTuning { pipelined: true, capped_gated: true, ..simple },
        "wgmma" => GemmTuning { wgmma: true, ..simple },
        // the TMA variant of the wgmma kernel (opt-in, not yet measured)
        "wgmma-tma" => GemmTuning { wgmma_tma: true, ..simple },
        "wgmma-mc" => GemmTuning { wgmma_multicast: true, ..simple },
        "decode" => GemmTuning { decode: true, ..simple },
        // every faster path where it is eligible: decode for few rows per expert, wgmma on
        // sm_90, the pipelined kernel elsewhere
        "best" => GemmTuning::BEST,
        // BEST with the cp.async wgmma kernel in place of its TMA variant
        "best-cp" => GemmTuning { wgmma_tma: false, ..GemmTuning::BEST },
        // BEST with the clustered (B multicast) TMA kernel
        "best-mc" => GemmTuning { wgmma_multicast: true, ..GemmTuning::BEST },
        _ => return None,
    })
}

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1).cloned())
}

fn main() -> R<()> {
    let ctx = match moe_cuda::try_context(0) {
        Ok(c) => c,
        Err(why) => {
            println!("bench: skipped: {why}");
            return Ok(());
        }
    };
    // SAFETY: no slice exists yet; the bench uses one stream.
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream()?;
    let decode_flag = std::env::args().any(|a| a == "--decode")
        || std::env::var("MOE_BENCH_DECODE").is_ok_and(|v| v == "1");
    // `--tuning simple|pipelined|pipelined-capped|wgmma|wgmma-tma|decode|best|best-cp|best-mc|wgmma-mc` (or MOE_GEMM_TUNING;
    // `--decode` / MOE_BENCH_DECODE=1 = decode): the GEMM kernels of the
    // whole-layer table (default: best, the backend's default)
    let tuning_name = arg("--tuning")
        .or_else(|| std::env::var("MOE_GEMM_TUNING").ok())
        .unwrap_or_else(|| if decode_flag { "decode" } else { "best" }.into());
    let tuning = tuning_by_name(&tuning_name).ok_or_else(|| {
        format!(
            "unknown --tuning {tuning_name} (simple, pipelined, pipelined-capped, wgmma, \
             wgmma-tma, wgmma-mc, decode, best, best-cp, best-mc)"
        )
    })?;
    let be0 = CudaBackend::new(s.clone())?;
    let be = be0.clone().with_tuning(tuning);
    let timer = Timer { stream: s.clone() };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let filler = Filler::new(&s, &mut rng)?;
    let tokens: Vec<usize> = arg("--tokens")
        .map(|t| t.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 128, 1024, 4096, 16384]);
    let want: Option<Vec<String>> =
        arg("--models").map(|m| m.split(',').map(String::from).collect());
    // `--kernel-tokens 16,4096`: the token counts of the per-kernel comparison lines
    let kernel_tokens: Vec<usize> = arg("--kernel-tokens")
        .map(|t| t.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 128, 4096, 16384]);
    let mut csv = arg("--csv").map(std::fs::File::create).transpose()?;

    println!("device: {}", ctx.name()?);
    println!(
        "layer table GEMM tuning: {tuning_name} ({tuning:?}); wgmma kernel available: {}; \
         TMA variant available: {}; clustered (multicast) variant available: {}",
        be.wgmma_available(),
        be.wgmma_tma_available(),
        be.wgmma_multicast_available()
    );
    let bw = copy_bandwidth(&s, &timer)?;
    println!("copy bandwidth (D2D, read + write): {:.0} GB/s", bw / 1e9);
    let own = own_gemm_rate(&be, &s, &timer, &filler, &mut rng)?;
    println!("moe-cuda dense bf16 GEMM 8192^3 ({tuning_name}): {:.0} TFLOP/s", own / 1e12);
    for name in ["simple", "pipelined", "wgmma", "wgmma-tma", "wgmma-mc"] {
        let t = tuning_by_name(name).expect("a known tuning name");
        let r = own_gemm_rate(&be0.clone().with_tuning(t), &s, &timer, &filler, &mut rng)?;
        println!("kernels dense bf16 GEMM 8192^3 {name}: {:.0} TFLOP/s", r / 1e12);
    }
    if let Some(c) = be0.wgmma_multicast_clusters() {
        println!("clustered kernel grid: {c} clusters of 2 CTAs (the driver's occupancy answer)");
    }
    let rate = match cublas_rate(&s, &timer, &filler, &mut rng) {
        Ok(r) => {
            println!(
                "cuBLAS bf16 matmul 8192^3: {:.0} TFLOP/s (the floor's matmul rate)",
                r / 1e12
            );
            r
        }
        Err(e) => {
            println!("cuBLAS unavailable ({e}); the floor uses the moe-cuda GEMM rate");
            own
        }
    };
    // `--dense-only`: stop after the dense rates (e.g. under a profiler)
    if std::env::args().any(|a| a == "--dense-only") {
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut kernel_lines = Vec::new();
    for m in models() {
        if want.as_ref().is_some_and(|w| !w.iter().any(|n| m.name.starts_with(n.as_str()))) {
            continue;
        }
        let tmax = *tokens.iter().max().unwrap_or(&1);
        let plan = be.make_plan(&m.config, tmax)?;
        let plan_simple = CudaBackend::plan(&m.config, tmax)?;
        let plan_tc = be
            .clone()
            .with_tuning(GemmTuning { pipelined: true, ..GemmTuning::SIMPLE })
            .make_plan(&m.config, tmax)?;
        let w = weights(&m.config, &s, &filler, &mut rng)?;
        let x = filler.tensor(&s, tmax * m.config.hidden, 1.0, &mut rng)?;
        let mut out = s.alloc_zeros::<bf16>(tmax * m.config.hidden)?;
        let ws_bytes = plan
            .layout(moe_core::DType::BF16)?
            .total_bytes
            .max(plan_tc.layout(moe_core::DType::BF16)?.total_bytes)
            .max(plan_simple.layout(moe_core::DType::BF16)?.total_bytes);
        let mut ws = s.alloc_zeros::<u8>(ws_bytes)?;
        for &t in &tokens {
            let r = bench_tokens(
                &be, &s, &timer, &m, &plan, &w, &x, &mut out, &mut ws, t, bw, rate, true,
            )?;
            let st: Vec<String> = r.stages.iter().map(|(n, v)| format!("{n} {v:.3}")).collect();
            println!(
                "{:<14} T={:<6} layer {:>8.3} ms (graph; direct {:>8.3}) {:>6.1} TFLOP/s {:>6.0} GB/s floor {:>7.3} ms = {:>5.1}% of floor | experts {} | {}",
                r.model,
                r.tokens,
                r.graph_ms,
                r.direct_ms,
                r.tflops,
                r.gbs,
                r.floor_ms,
                100.0 * r.floor_ms / r.graph_ms,
                r.experts_touched,
                st.join(", ")
            );
            if let Some(f) = csv.as_mut() {
                writeln!(
                    f,
                    "{},{},{:.4},{:.4},{:.2},{:.1},{:.4},{},{}",
                    r.model,
                    r.tokens,
                    r.graph_ms,
                    r.direct_ms,
                    r.tflops,
                    r.gbs,
                    r.floor_ms,
                    r.experts_touched,
                    st.join(";")
                )?;
            }
            rows.push(r);
        }
        // the GEMM kernel variants on some token counts
        for &t in tokens.iter().filter(|t| kernel_tokens.contains(t)) {
            let mut line = format!("kernels {:<14} T={:<6}", m.name, t);
            for name in ["best-mc", "wgmma-mc", "wgmma-tma", "wgmma", "pipelined", "decode"] {
                let b = be0.clone().with_tuning(tuning_by_name(name).expect("a known tuning name"));
                // the plan padded the way this tuning wants (CudaBackend::row_align)
                let p = if b.row_align() == plan_tc.row_align() { &plan_tc } else { &plan_simple };
                let r = bench_tokens(
                    &b, &s, &timer, &m, p, &w, &x, &mut out, &mut ws, t, bw, rate, false,
                )?;
                line.push_str(&format!(
                    " | {name} {:.3} ms ({:.1}% of floor)",
                    r.graph_ms,
                    100.0 * r.floor_ms / r.graph_ms
                ));
            }
            println!("{line}");
            kernel_lines.push(line);
        }
    }
    println!();
    for l in &kernel_lines {
        println!("{l}");
    }
    println!("\n| model | T | layer ms | TFLOP/s | GB/s | floor ms | % of floor |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.1} | {:.0} | {:.3} | {:.1}% |",
            r.model,
            r.tokens,
            r.graph_ms,
            r.tflops,
            r.gbs,
            r.floor_ms,
            100.0 * r.floor_ms / r.graph_ms
        );
    }
    Ok(())
}
