//! Multi-GPU MoE layers over NCCL on two GPUs (bf16, canonical shapes), one thread per rank:
//!
//! * TP = 2 (`moe_core::forward` with an `NcclCollective`): the layer with its one merged
//!   all-reduce (routed + shared partial sums reduced once), the all-reduce alone, and the
//!   layer with a second all-reduce of the same size (what reducing the routed and shared
//!   outputs separately would cost);
//! * EP = 2 over the all-to-all (`moe_cuda::ep::ExpertParallel`), the T tokens split between
//!   the ranks (the same global batch as TP), no all-reduce.
//!
//! Times are host wall-clock per layer (mean over iterations, after a warm-up, with one stream
//! synchronize at the end; the EP forward synchronizes twice per layer by design), on rank 0,
//! in microseconds; percentages are of the TP layer time.
//!
//! Usage: `multi_gpu_bench [--models qwen3,gpt-oss,mixtral,deepseek] [--tokens 1,128,4096]
//! [--iters N]`. Needs the feature `nccl`. Prints a skip message and exits 0 without a CUDA
//! driver, NCCL or two GPUs.
#![allow(missing_docs)]

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use moe_core::config::*;
use moe_core::{MlpWeights, MoeWeights, SharedWeights};
use moe_cuda::ep::{EpLayout, ExpertParallel};
use moe_cuda::nccl::{NcclCollective, NcclId, nccl_available};
use moe_cuda::{CudaBackend, DevView, DevViewMut};
use std::sync::Arc;
use std::time::Instant;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WORLD: usize = 2;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn mlp(i: usize, act: Activation, bias: bool) -> MlpConfig {
    MlpConfig { intermediate: i, gated: true, activation: act, bias }
}

fn models() -> Vec<(&'static str, MoeConfig)> {
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
        ("qwen3-30b-a3b", base(2048, 128, 8, 768, softmax, Activation::Silu, false)),
        (
            "gpt-oss-120b",
            base(
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
        ),
        ("mixtral-8x7b", base(4096, 8, 2, 14336, softmax, Activation::Silu, false)),
        ("deepseek-v3", ds),
    ]
}

/// Device tensors filled by tiling one random chunk (never zeros), scaled per tensor.
struct Filler {
    stream: Arc<CudaStream>,
    chunks: Vec<(u32, CudaSlice<bf16>)>,
    rng: Rng,
}

impl Filler {
    fn new(stream: &Arc<CudaStream>, seed: u64) -> Filler {
        Filler { stream: stream.clone(), chunks: Vec::new(), rng: Rng(seed | 1) }
    }
    fn tensor(&mut self, n: usize, scale: f32) -> R<CudaSlice<bf16>> {
        const CHUNK: usize = (1 << 22) + 7;
        let key = scale.to_bits();
        if !self.chunks.iter().any(|(k, _)| *k == key) {
            let host: Vec<bf16> =
                (0..CHUNK).map(|_| bf16::from_f32(self.rng.next() * scale * 1.7)).collect();
            self.chunks.push((key, self.stream.clone_htod(&host)?));
        }
        let chunk = &self.chunks.iter().find(|(k, _)| *k == key).ok_or("chunk")?.1;
        let mut d = self.stream.alloc_zeros::<bf16>(n.max(1))?;
        let mut at = 0;
        while at < n {
            let len = (n - at).min(chunk.len());
            self.stream.memcpy_dtod(&chunk.slice(0..len), &mut d.slice_mut(at..at + len))?;
            at += len;
        }
        Ok(d)
    }
}

struct DevMlp {
    gate: CudaSlice<bf16>,
    up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
    bias: Option<(CudaSlice<bf16>, CudaSlice<bf16>, Option<CudaSlice<bf16>>)>,
}

struct Weights {
    router: CudaSlice<bf16>,
    router_bias: Option<CudaSlice<bf16>>,
    selection_bias: Option<CudaSlice<f32>>,
    experts: DevMlp,
    shared: Option<DevMlp>,
    expert_map: Option<CudaSlice<i32>>,
}

fn dev_mlp(
    f: &mut Filler,
    m: &MlpConfig,
    n: usize,
    i: usize,
    h: usize,
    out_bias: bool,
) -> R<DevMlp> {
    let (sh, si) = (1.0 / (h as f32).sqrt(), 1.0 / (m.intermediate as f32).sqrt());
    Ok(DevMlp {
        gate: f.tensor(n * i * h, sh)?,
        up: f.tensor(n * i * h, sh)?,
        down: f.tensor(n * h * i, si)?,
        bias: if m.bias {
            Some((
                f.tensor(n * i, 0.1)?,
                f.tensor(n * i, 0.1)?,
                if out_bias { Some(f.tensor(n * h, 0.1)?) } else { None },
            ))
        } else {
            None
        },
    })
}

/// This rank's weights for `c` (its TP shard or its experts; output biases where the
/// configuration adds them).
fn weights(c: &MoeConfig, f: &mut Filler, map: Option<Vec<i32>>) -> R<Weights> {
    let (h, e) = (c.hidden, c.experts);
    let ob = c.adds_output_bias();
    let s = f.stream.clone();
    Ok(Weights {
        router: f.tensor(e * h, 1.0 / (h as f32).sqrt())?,
        router_bias: if c.router.bias { Some(f.tensor(e, 0.1)?) } else { None },
        selection_bias: if c.router.selection_bias {
            let v: Vec<f32> = (0..e).map(|_| f.rng.next() * 0.01).collect();
            Some(s.clone_htod(&v)?)
        } else {
            None
        },
        experts: dev_mlp(f, &c.expert.mlp, c.local_experts(), c.local_intermediate(), h, ob)?,
        shared: match c.shared {
            Some(sc) if c.computes_shared() => {
                Some(dev_mlp(f, &sc.mlp, 1, c.shared_local_intermediate(), h, ob)?)
            }
            _ => None,
        },
        expert_map: map.map(|m| s.clone_htod(&m)).transpose()?,
    })
}

fn mlp_views(m: &DevMlp) -> MlpWeights<'_, CudaBackend, bf16> {
    MlpWeights {
        gate: Some(DevView::of(&m.gate)),
        up: DevView::of(&m.up),
        down: DevView::of(&m.down),
        gate_bias: m.bias.as_ref().map(|b| DevView::of(&b.0)),
        up_bias: m.bias.as_ref().map(|b| DevView::of(&b.1)),
        down_bias: m.bias.as_ref().and_then(|b| b.2.as_ref()).map(DevView::of),
    }
}

fn views(w: &Weights) -> MoeWeights<'_, CudaBackend, bf16> {
    MoeWeights {
        router: DevView::of(&w.router),
        router_bias: w.router_bias.as_ref().map(DevView::of),
        selection_bias: w.selection_bias.as_ref().map(DevView::of),
        experts: mlp_views(&w.experts),
        shared: w.shared.as_ref().map(|m| SharedWeights { mlp: mlp_views(m), gate: None }),
        latent: None,
        expert_map: w.expert_map.as_ref().map(DevView::of),
    }
}

/// Mean host wall-clock microseconds of `iters` calls of `f` after one warm-up call.
fn time_us(s: &CudaStream, iters: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?;
    s.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    s.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
}

#[derive(Clone, Copy, Debug, Default)]
struct TpTimes {
    layer: f64,
    all_reduce: f64,
    separate: f64,
    all_reduces_per_layer: f64,
}

/// TP = 2 on one rank: the layer (one merged all-reduce), the all-reduce alone, and the layer
/// plus a second all-reduce of the same size.
fn tp_rank(
    rank: usize,
    comm: &NcclCollective,
    be: &CudaBackend,
    c: &MoeConfig,
    tokens: &[usize],
    iters: usize,
) -> R<Vec<TpTimes>> {
    let s = be.stream().clone();
    let mut rc = *c;
    rc.parallel.tp_size = WORLD;
    rc.parallel.tp_rank = rank;
    let tmax = tokens.iter().copied().max().unwrap_or(1);
    // The same seed on every rank: the router and the input are replicated under TP.
    let mut f = Filler::new(&s, 0x9e37_79b9);
    let w = weights(&rc, &mut f, None)?;
    let wv = views(&w);
    let plan = be.make_plan(&rc, tmax)?;
    let h = c.hidden;
    let x = f.tensor(tmax * h, 1.0)?;
    let mut out = s.alloc_zeros::<bf16>(tmax * h)?;
    let mut extra = s.alloc_zeros::<bf16>(tmax * h)?;
    let mut ws = s.alloc_zeros::<u8>(plan.workspace_bytes(moe_core::DType::BF16)?)?;
    let mut rows = Vec::new();
    for &t in tokens {
        let calls = comm.all_reduce_calls();
        let mut layer = || -> R<()> {
            moe_core::forward(
                be,
                &plan,
                &wv,
                t,
                DevView::of(&x).prefix(t * h),
                DevViewMut::of(&mut out).prefix(t * h),
                DevViewMut::of(&mut ws),
                comm,
            )?;
            Ok(())
        };
        let layer_us = time_us(&s, iters, &mut layer)?;
        let per_layer = (comm.all_reduce_calls() - calls) as f64 / (iters + 1) as f64;
        let ar_us = time_us(&s, iters, || {
            Ok(moe_core::Collective::<CudaBackend, bf16>::all_reduce_sum(
                comm,
                be,
                DevViewMut::of(&mut extra).prefix(t * h),
            )?)
        })?;
        let sep_us = time_us(&s, iters, || {
            layer()?;
            Ok(moe_core::Collective::<CudaBackend, bf16>::all_reduce_sum(
                comm,
                be,
                DevViewMut::of(&mut extra).prefix(t * h),
            )?)
        })?;
        rows.push(TpTimes {
            layer: layer_us,
            all_reduce: ar_us,
            separate: sep_us,
            all_reduces_per_layer: per_layer,
        });
    }
    Ok(rows)
}

#[derive(Clone, Copy, Debug, Default)]
struct EpTimes {
    layer: f64,
    sent: usize,
    received: usize,
    all_reduces: usize,
}

/// EP = 2 on one rank over the all-to-all; rank r holds tokens r * T / 2 .. (r + 1) * T / 2.
fn ep_rank(
    rank: usize,
    comm: &NcclCollective,
    be: &CudaBackend,
    c: &MoeConfig,
    tokens: &[usize],
    iters: usize,
) -> R<Vec<EpTimes>> {
    let s = be.stream().clone();
    let layout = EpLayout::contiguous(c.experts, WORLD)?;
    let mut rc = *c;
    rc.parallel.experts =
        Some(ExpertPlacement { local_experts: layout.local_experts(rank), include_shared: true });
    let share = |t: usize| (rank + 1) * t / WORLD - rank * t / WORLD;
    let tmax = tokens.iter().map(|&t| t.div_ceil(WORLD)).max().unwrap_or(1);
    let mut f = Filler::new(&s, 0x9e37_79b9);
    let w = weights(&rc, &mut f, Some(layout.expert_map(rank)))?;
    let wv = views(&w);
    let plan = be.make_plan(&rc, tmax)?;
    let h = c.hidden;
    let x = f.tensor(tmax * h, 1.0)?;
    let mut out = s.alloc_zeros::<bf16>(tmax * h)?;
    let mut ws = s.alloc_zeros::<u8>(plan.workspace_bytes(moe_core::DType::BF16)?)?;
    let mut ep = ExpertParallel::<bf16>::new(&s, &rc, layout, rank, tmax)?;
    let mut rows = Vec::new();
    for &t in tokens {
        let n = share(t);
        let calls = comm.all_reduce_calls();
        let mut stats = Default::default();
        let layer_us = time_us(&s, iters, || {
            stats = ep.forward(
                be,
                comm,
                &plan,
                &wv,
                n,
                DevView::of(&x).prefix(n * h),
                DevViewMut::of(&mut out).prefix(n * h),
                DevViewMut::of(&mut ws),
            )?;
            Ok(())
        })?;
        let st: moe_cuda::ep::EpStats = stats;
        rows.push(EpTimes {
            layer: layer_us,
            sent: st.sent_rows,
            received: st.received_rows,
            all_reduces: comm.all_reduce_calls() - calls,
        });
    }
    Ok(rows)
}

fn on_ranks<T: Send>(f: impl Fn(usize, &NcclCollective, &CudaBackend) -> R<T> + Sync) -> R<Vec<T>> {
    let id = NcclId::new()?;
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..WORLD)
            .map(|rank| {
                let f = &f;
                sc.spawn(move || -> R<T> {
                    let ctx = moe_cuda::try_context(rank)?;
                    // SAFETY: no slice exists yet in this context; one stream per rank.
                    unsafe { ctx.disable_event_tracking() };
                    let be = CudaBackend::new(ctx.new_stream()?)?;
                    let comm = NcclCollective::new(&ctx, rank, WORLD, &id)?;
                    f(rank, &comm, &be)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().map_err(|_| "rank thread panicked")?).collect()
    })
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> R<()> {
    if let Err(why) = moe_cuda::try_context(0) {
        println!("multi_gpu_bench: skipped: {why}");
        return Ok(());
    }
    if !nccl_available() {
        println!("multi_gpu_bench: skipped: {}", moe_cuda::nccl::nccl_unavailable_reason());
        return Ok(());
    }
    let n = CudaContext::device_count().unwrap_or(0);
    if (n as usize) < WORLD {
        println!("multi_gpu_bench: skipped: {n} GPU(s), {WORLD} needed");
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let wanted = arg(&args, "--models");
    let tokens: Vec<usize> = match arg(&args, "--tokens") {
        Some(t) => t.split(',').map(|v| v.trim().parse()).collect::<Result<_, _>>()?,
        None => vec![1, 128, 4096],
    };
    let iters: usize = arg(&args, "--iters").map(|v| v.parse()).transpose()?.unwrap_or(20);
    println!(
        "multi_gpu_bench: {WORLD} GPUs, NCCL {}, bf16, {iters} iterations per point",
        moe_cuda::nccl::nccl_version()?
    );
    println!(
        "{:<14} {:>5} | {:>10} {:>9} {:>6} {:>12} {:>7} {:>5} | {:>10} {:>7} {:>9} {:>9}",
        "model",
        "T",
        "TP us",
        "AR us",
        "AR %",
        "TP+AR us",
        "+%",
        "ARs",
        "EP us",
        "EP/TP",
        "EP sent",
        "EP recv"
    );
    for (name, c) in models() {
        if let Some(w) = &wanted
            && !w.split(',').any(|m| name.starts_with(m.trim()))
        {
            continue;
        }
        let tp = on_ranks(|rank, comm, be| tp_rank(rank, comm, be, &c, &tokens, iters))?;
        let ep = on_ranks(|rank, comm, be| ep_rank(rank, comm, be, &c, &tokens, iters))?;
        for (i, &t) in tokens.iter().enumerate() {
            let (a, e) = (tp[0][i], ep[0][i]);
            println!(
                "{:<14} {:>5} | {:>10.1} {:>9.1} {:>5.1}% {:>12.1} {:>6.1}% {:>5.2} | {:>10.1} {:>7.2} {:>9} {:>9}",
                name,
                t,
                a.layer,
                a.all_reduce,
                100.0 * a.all_reduce / a.layer,
                a.separate,
                100.0 * (a.separate - a.layer) / a.layer,
                a.all_reduces_per_layer,
                e.layer,
                e.layer / a.layer,
                e.sent,
                e.received,
            );
            if e.all_reduces != 0 {
                return Err(format!("{name} T={t}: EP made {} all-reduces", e.all_reduces).into());
            }
        }
    }
    println!(
        "TP us: layer with its one merged all-reduce; AR us: that all-reduce alone (T x H bf16); \
         TP+AR: the layer with a second, separate all-reduce (routed and shared reduced apart); \
         ARs: all-reduces per TP layer (counted); EP: T split over the ranks, rows per rank 0."
    );
    Ok(())
}
