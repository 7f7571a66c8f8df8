//! Times a whole forward of the wgpu backend on the canonical shapes, in bf16 (and f16 where
//! the adapter has `SHADER_F16`), and reports each point against the same floor as the CUDA
//! bench (`moe-cuda/examples/bench.rs`), with the adapter's copy bandwidth measured in the same
//! run:
//!
//! * bytes = distinct experts touched x 3 H I x 2 + shared 3 H Is x 2 + 2 T H x 2
//! * flops = 2 T K 3 H I (+ 2 T 3 H Is for a shared expert)
//! * floor = max(bytes / bandwidth, flops / peak), bandwidth = max(copy bandwidth, shader read
//!   bandwidth), both measured at start (`copy_buffer_to_buffer` of 1 GiB, read + write; a
//!   compute shader reading 1 GiB one 16-byte word per invocation); the CSV's last two columns
//!   give both (GB/s); peak: `--peak-tflops`, by default the dense bf16 figure of an
//!   H100/H200 when the adapter's name says so, otherwise no flop floor
//!
//! Each point: one forward to read the routing (distinct experts touched), 2 warm-up forwards,
//! then 3 rounds of N forwards submitted back to back and one wait; the median round gives
//! `ms` (wall clock per forward, the headline figure). `submit` is the host time to enqueue a
//! forward (when it is close to `ms`, the point is bound by the host, not the GPU); `gpu` is the
//! span of GPU timestamps around the round where the adapter has `TIMESTAMP_QUERY_INSIDE_ENCODERS`.
//! Each line also gives the compute dispatches of one forward (how many of them the few-row
//! GEMM, `moe_shaders::GEMV`) and its queue submissions (one per forward: its stages are
//! recorded into one encoder; `MOE_WGPU_BATCH_FORWARD=0` submits each stage on its own, for
//! A/B); where the device has `TIMESTAMP_QUERY`, a second line gives the GPU time of each stage
//! (timestamps at the beginning and end of each stage's compute pass, median of 3 more
//! forwards), their sum, and the span of the forward (the difference: GPU idle between the
//! stages' passes and submissions). The environment
//! variable `MOE_WGPU_EXPERT_GEMM=tiled|decode|decode-scalar|auto` picks the expert GEMM
//! variant, `MOE_WGPU_GEMV_MAX_ROWS=N` the most rows for which the few-row GEMM is taken
//! (`moe_wgpu::Options::gemv_max_rows`), `MOE_WGPU_GEMV_KERNEL=stream|resident` its kernel
//! (`moe_wgpu::Options::few_row`) and `MOE_WGPU_GEMV_STREAM_WORDS=N` the stream kernel's words
//! per lane (`moe_wgpu::Options::gemv_stream_words`).
//!
//! A tensor larger than the device's `max_storage_buffer_binding_size` (wgpu caps it at
//! 2^31 - 1 bytes on Vulkan) cannot be bound: the expert count is halved until every tensor fits, and the
//! shape's name says so.
//!
//! Usage: `wgpu_bench [--info] [--quick] [--models qwen3,gpt-oss,mixtral,deepseek] [--tokens 1,16,128,1024]
//! [--dtypes bf16,f16] [--csv FILE] [--cuda-csv FILE] [--peak-tflops X] [--budget-s S]`.
//! `--quick` runs tiny versions of the shapes at T in {1, 16} (for software adapters such as
//! lavapipe). `--info` prints the adapter, features and limits and exits. `--cuda-csv` reads the CSV of the CUDA bench and prints its figures for the same
//! model and T next to these. Exits 0 with a message where no adapter exists.
#![allow(missing_docs)]

use half::{bf16, f16};
use moe_core::conformance::Rng;
use moe_core::*;
use moe_wgpu::{Options, WgpuBackend, WgpuView, WgpuViewMut};
use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

struct Model {
    name: &'static str,
    config: MoeConfig,
}

fn mlp(i: usize, act: Activation, bias: bool) -> MlpConfig {
    MlpConfig { intermediate: i, gated: true, activation: act, bias }
}

/// The canonical shapes, configured as in the CUDA bench. `div` divides H and I and `emax`
/// caps E (the `--quick` shapes).
fn models(div: usize, emax: usize) -> Vec<Model> {
    let base = |h: usize, e: usize, k: usize, i: usize, router: RouterConfig, act, bias| {
        let e = e.min(emax);
        MoeConfig {
            hidden: h / div,
            experts: e,
            top_k: k.min(e),
            router,
            expert: ExpertConfig { mlp: mlp(i / div, act, bias), apply_weight_on_input: false },
            shared: None,
            latent: None,
            parallel: ParallelConfig::default(),
        }
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
    ds.shared = Some(SharedConfig {
        mlp: mlp(2048 / div, Activation::Silu, false),
        gate: SharedGate::None,
    });
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

/// Halve the expert count until every tensor of `c` fits one binding and one buffer (keeping
/// E >= K and E a multiple of the expert-group count). Returns the note for the shape's name.
fn fit(c: &mut MoeConfig, elem: u64, max_binding: u64, max_buffer: u64) -> Option<String> {
    let limit = max_binding.min(max_buffer);
    let tensor = |c: &MoeConfig| (c.experts * c.hidden * c.expert.mlp.intermediate) as u64 * elem;
    let e0 = c.experts;
    let groups = c.router.groups.map_or(1, |g| g.n_group);
    while tensor(c) > limit && c.experts / 2 >= c.top_k && (c.experts / 2).is_multiple_of(groups) {
        c.experts /= 2;
    }
    (c.experts != e0).then(|| format!("E={} (scaled from {e0}: binding limit)", c.experts))
}

/// Device tensors filled by tiling a random chunk (one per scale) with buffer copies.
struct Filler {
    chunk_len: usize,
    chunks: HashMap<(u32, u8), wgpu::Buffer>,
    rng: Rng,
}

impl Filler {
    fn buffer(be: &WgpuBackend, bytes: u64) -> wgpu::Buffer {
        be.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu_bench"),
            size: bytes.div_ceil(4).max(1) * 4,
            usage: USAGE,
            mapped_at_creation: false,
        })
    }

    fn upload<T: Element>(be: &WgpuBackend, v: &[f64]) -> wgpu::Buffer {
        let e: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
        let mut bytes: Vec<u8> = bytemuck::cast_slice(&e).to_vec();
        bytes.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
        let b = Self::buffer(be, bytes.len() as u64);
        be.queue().write_buffer(&b, 0, &bytes);
        b
    }

    /// `n` elements of `T`, normals scaled by `scale` (a tiled random chunk).
    fn tensor<T: Element>(&mut self, be: &WgpuBackend, n: usize, scale: f64) -> wgpu::Buffer {
        let key = ((scale as f32).to_bits(), size_of::<T>() as u8);
        if !self.chunks.contains_key(&key) {
            let host = self.rng.tensor(self.chunk_len, scale);
            self.chunks.insert(key, Self::upload::<T>(be, &host));
        }
        let chunk = &self.chunks[&key];
        let total = ((n * size_of::<T>()) as u64).div_ceil(4).max(1) * 4;
        let b = Self::buffer(be, total);
        let step = chunk.size();
        let mut enc = be.device().create_command_encoder(&Default::default());
        let mut at = 0;
        while at < total {
            let len = (total - at).min(step);
            enc.copy_buffer_to_buffer(chunk, 0, &b, at, len);
            at += len;
        }
        be.queue().submit([enc.finish()]);
        b
    }
}

/// GPU timestamps around a round of forwards, where the device can write them in encoders.
struct Stamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    period_ns: f64,
}

impl Stamps {
    fn new(be: &WgpuBackend) -> Option<Stamps> {
        let need =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        if !be.device().features().contains(need) {
            return None;
        }
        let d = be.device();
        let set = d.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("wgpu_bench"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu_bench resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu_bench read"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Some(Stamps { set, resolve, read, period_ns: f64::from(be.queue().get_timestamp_period()) })
    }

    fn write(&self, be: &WgpuBackend, index: u32) {
        let mut enc = be.device().create_command_encoder(&Default::default());
        enc.write_timestamp(&self.set, index);
        if index == 1 {
            enc.resolve_query_set(&self.set, 0..2, &self.resolve, 0);
            enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, 16);
        }
        be.queue().submit([enc.finish()]);
    }

    /// Nanoseconds between the two stamps (after the wait).
    fn elapsed_ns(&self, be: &WgpuBackend) -> R<f64> {
        self.read.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        be.synchronize()?;
        let v: Vec<u64> = {
            let m = self.read.slice(..).get_mapped_range().map_err(|e| format!("{e:?}"))?;
            bytemuck::pod_collect_to_vec(&m)
        };
        self.read.unmap();
        Ok(v[1].wrapping_sub(v[0]) as f64 * self.period_ns)
    }
}

fn read_bytes(be: &WgpuBackend, b: &wgpu::Buffer, offset: u64, bytes: u64) -> R<Vec<u8>> {
    let size = bytes.div_ceil(4).max(1) * 4;
    let staging = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu_bench readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = be.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(b, offset, &staging, 0, size);
    be.queue().submit([enc.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    be.synchronize()?;
    let v = staging.slice(..).get_mapped_range().map_err(|e| format!("{e:?}"))?.to_vec();
    Ok(v[..bytes as usize].to_vec())
}

/// Bytes per second of `run(n)` (n back-to-back repetitions moving `moved` bytes each, one
/// submission): two warm-up repetitions, then the median of 3 rounds of 10, by wall clock and,
/// where the device has them, by GPU timestamps.
fn rates(
    be: &WgpuBackend,
    stamps: Option<&Stamps>,
    moved: u64,
    run: &dyn Fn(usize),
) -> R<(f64, Option<f64>)> {
    run(2);
    be.synchronize()?;
    let iters = 10;
    let mut rounds = Vec::new();
    let mut gpu = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        if let Some(s) = stamps {
            s.write(be, 0);
        }
        run(iters);
        if let Some(s) = stamps {
            s.write(be, 1);
            gpu.push(s.elapsed_ns(be)? * 1e-9);
        }
        be.synchronize()?;
        rounds.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let bw = |s: f64| moved as f64 * iters as f64 / s;
    let wall = bw(med(&mut rounds));
    let gpu = if gpu.is_empty() { None } else { Some(bw(med(&mut gpu))) };
    Ok((wall, gpu))
}

/// Copy bandwidth (read + write bytes per second) of buffer-to-buffer copies of `bytes`.
fn copy_bandwidth(be: &WgpuBackend, bytes: u64, stamps: Option<&Stamps>) -> R<(f64, Option<f64>)> {
    let a = Filler::buffer(be, bytes);
    let b = Filler::buffer(be, bytes);
    let copy = |n: usize| {
        let mut enc = be.device().create_command_encoder(&Default::default());
        for _ in 0..n {
            enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
        }
        be.queue().submit([enc.finish()]);
    };
    rates(be, stamps, 2 * bytes, &copy)
}

/// The read kernel of the bandwidth floor: `read1` of the `wgpu_bandwidth` probe (one 16-byte
/// word per invocation over a 2-D grid of 256-wide workgroups).
const READ_SHADER: &str = include_str!("bandwidth.wgsl");

/// Read bandwidth (bytes per second) of a compute shader reading a buffer of `bytes` with
/// non-zero contents, one 16-byte word per invocation: what the GEMMs' weight streams can
/// reach on this adapter (on the H100 through NVIDIA's Vulkan driver: 2.9 TB/s, while
/// `copy_buffer_to_buffer` runs at 0.84 TB/s read + write). Wall clock, and GPU timestamps
/// where the device has them.
fn shader_read_bandwidth(
    be: &WgpuBackend,
    bytes: u64,
    stamps: Option<&Stamps>,
) -> R<(f64, Option<f64>)> {
    let d = be.device();
    let bytes = bytes / 16 * 16;
    let src = Filler::buffer(be, bytes);
    let dst = Filler::buffer(be, 1024);
    // non-zero contents (a zero buffer might read faster through compression)
    let chunk = (16u64 << 20).min(bytes);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..chunk)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect();
    let mut off = 0;
    while off < bytes {
        let n = chunk.min(bytes - off);
        be.queue().write_buffer(&src, off, &data[..n as usize]);
        off += n;
    }
    let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("wgpu_bench read"),
        source: wgpu::ShaderSource::Wgsl(READ_SHADER.into()),
    });
    let p = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("read1"),
        layout: None,
        module: &module,
        entry_point: Some("read1"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &p.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: src.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: dst.as_entire_binding() },
        ],
    });
    let wg = (bytes / 16).div_ceil(256);
    let gy = wg.div_ceil(32768);
    let gx = wg.div_ceil(gy);
    let (gx, gy) = (gx as u32, gy as u32);
    let read = |n: usize| {
        let mut enc = d.create_command_encoder(&Default::default());
        for _ in 0..n {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&p);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        be.queue().submit([enc.finish()]);
    };
    rates(be, stamps, bytes, &read)
}

/// One measured point.
struct Point {
    ms: f64,
    submit_ms: f64,
    gpu_ms: Option<f64>,
    touched: usize,
    bytes: f64,
    floor_ms: f64,
    /// Per forward: compute dispatches, of which few-row GEMMs, queue submissions, and stages
    /// (compute passes).
    counts: (usize, usize, usize, usize),
    /// Per stage of one forward: its kernel and GPU microseconds (median over 3 forwards),
    /// and the span of the forward from the first stage's start to the last one's end (gaps
    /// between submissions included); empty without `TIMESTAMP_QUERY`.
    stages: Vec<(&'static str, f64)>,
    span_us: f64,
    /// Median over the 3 forwards of the span less the sum of its stages (GPU idle).
    gaps_us: f64,
}

struct Weights {
    router: wgpu::Buffer,
    router_bias: Option<wgpu::Buffer>,
    selection_bias: Option<wgpu::Buffer>,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    down: wgpu::Buffer,
    bias: Option<[wgpu::Buffer; 3]>,
    shared: Option<[wgpu::Buffer; 3]>,
}

fn weights<T: Element>(be: &WgpuBackend, c: &MoeConfig, f: &mut Filler) -> Weights {
    let (h, e, i) = (c.hidden, c.experts, c.local_intermediate());
    let (sh, si) = (1.0 / (h as f64).sqrt(), 1.0 / (i as f64).sqrt());
    let router = Filler::upload::<T>(be, &f.rng.tensor(e * h, sh));
    let router_bias = c.router.bias.then(|| Filler::upload::<T>(be, &f.rng.tensor(e, 0.1)));
    let selection_bias =
        c.router.selection_bias.then(|| Filler::upload::<f32>(be, &f.rng.tensor(e, 0.01)));
    let bias = c.expert.mlp.bias.then(|| {
        [
            Filler::upload::<T>(be, &f.rng.tensor(e * i, 0.1)),
            Filler::upload::<T>(be, &f.rng.tensor(e * i, 0.1)),
            Filler::upload::<T>(be, &f.rng.tensor(e * h, 0.1)),
        ]
    });
    let shared = c.shared.map(|s| {
        let is = s.mlp.intermediate;
        [
            f.tensor::<T>(be, is * h, sh),
            f.tensor::<T>(be, is * h, sh),
            f.tensor::<T>(be, h * is, 1.0 / (is as f64).sqrt()),
        ]
    });
    Weights {
        router,
        router_bias,
        selection_bias,
        gate: f.tensor::<T>(be, e * i * h, sh),
        up: f.tensor::<T>(be, e * i * h, sh),
        down: f.tensor::<T>(be, e * h * i, si),
        bias,
        shared,
    }
}

fn view<U: bytemuck::Pod>(b: &wgpu::Buffer, len: usize) -> R<WgpuView<'_, U>> {
    Ok(WgpuView::new(b, 0, len)?)
}

fn views<'a, T: Element>(c: &MoeConfig, w: &'a Weights) -> R<MoeWeights<'a, WgpuBackend, T>> {
    let (h, e, i) = (c.hidden, c.experts, c.local_intermediate());
    let mlp = |g: &'a wgpu::Buffer, u: &'a wgpu::Buffer, d: &'a wgpu::Buffer, i: usize| {
        R::Ok(MlpWeights {
            gate: Some(view(g, e * i * h)?),
            up: view(u, e * i * h)?,
            down: view(d, e * h * i)?,
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        })
    };
    let mut experts = mlp(&w.gate, &w.up, &w.down, i)?;
    if let Some([g, u, d]) = &w.bias {
        experts.gate_bias = Some(view(g, e * i)?);
        experts.up_bias = Some(view(u, e * i)?);
        experts.down_bias = Some(view(d, e * h)?);
    }
    let shared = match (&w.shared, c.shared) {
        (Some([g, u, d]), Some(s)) => {
            let is = s.mlp.intermediate;
            Some(SharedWeights {
                mlp: MlpWeights {
                    gate: Some(view(g, is * h)?),
                    up: view(u, is * h)?,
                    down: view(d, h * is)?,
                    gate_bias: None,
                    up_bias: None,
                    down_bias: None,
                },
                gate: None,
            })
        }
        _ => None,
    };
    Ok(MoeWeights {
        router: view(&w.router, e * h)?,
        router_bias: w.router_bias.as_ref().map(|b| view(b, e)).transpose()?,
        selection_bias: w.selection_bias.as_ref().map(|b| view(b, e)).transpose()?,
        experts,
        shared,
        latent: None,
        expert_map: None,
    })
}

struct Ctx<'a> {
    be: &'a WgpuBackend,
    stamps: Option<&'a Stamps>,
    /// The bandwidth floor's rate: max(copy_bw, read_bw).
    bw: f64,
    /// copy_buffer_to_buffer, read + write bytes per second.
    copy_bw: f64,
    /// A compute shader's read rate (one 16-byte word per invocation).
    read_bw: f64,
    peak: f64,
    quick: bool,
}

#[allow(clippy::too_many_arguments)]
fn bench_point<T: Element>(
    cx: &Ctx<'_>,
    c: &MoeConfig,
    plan: &MoePlan,
    w: &MoeWeights<'_, WgpuBackend, T>,
    x: &wgpu::Buffer,
    out: &wgpu::Buffer,
    ws: &wgpu::Buffer,
    ws_bytes: usize,
    tokens: usize,
) -> R<Point>
where
    WgpuBackend: MoeStages<T>,
{
    let be = cx.be;
    let (h, k, i, e) = (c.hidden, c.top_k, c.local_intermediate(), c.experts);
    let fwd = || -> R<()> {
        forward(
            be,
            plan,
            w,
            tokens,
            view(x, tokens * h)?,
            WgpuViewMut::new(out, 0, tokens * h)?,
            WgpuViewMut::<u8>::new(ws, 0, ws_bytes)?,
            &SingleRank,
        )?;
        Ok(())
    };
    let (d0, g0, s0, p0) = (be.dispatches(), be.gemv_dispatches(), be.submits(), be.stages());
    fwd()?;
    let counts =
        (be.dispatches() - d0, be.gemv_dispatches() - g0, be.submits() - s0, be.stages() - p0);
    be.synchronize()?;
    // the distinct experts touched, from the routing in the workspace (buffer offset 0 is
    // aligned, so the layout's offsets apply as they are)
    let layout = plan.layout(T::DTYPE)?;
    let ids = read_bytes(be, ws, layout.topk_ids.offset as u64, (4 * tokens * k) as u64)?;
    let mut seen = vec![false; e];
    for id in bytemuck::pod_collect_to_vec::<u8, i32>(&ids) {
        if let Some(s) = usize::try_from(id).ok().and_then(|id| seen.get_mut(id)) {
            *s = true;
        }
    }
    let touched = seen.iter().filter(|&&b| b).count();
    let is = c.shared_local_intermediate();
    let elem = size_of::<T>() as f64;
    let (t, h, i) = (tokens as f64, h as f64, i as f64);
    let flops = 2.0 * t * k as f64 * 3.0 * h * i + 2.0 * t * 3.0 * h * is as f64;
    let bytes =
        touched as f64 * 3.0 * h * i * elem + 3.0 * h * is as f64 * elem + 2.0 * t * h * elem;
    let floor_s = (bytes / cx.bw).max(if cx.peak > 0.0 { flops / cx.peak } else { 0.0 });
    // warm-up, then 3 rounds of `iters` forwards back to back and one wait each
    fwd()?;
    fwd()?;
    be.synchronize()?;
    let t0 = Instant::now();
    fwd()?;
    be.synchronize()?;
    let one = t0.elapsed().as_secs_f64();
    let target = if cx.quick { 0.05 } else { 0.2 };
    let iters = ((target / one.max(floor_s).max(1e-6)) as usize).clamp(3, 200);
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        if let Some(s) = cx.stamps {
            s.write(be, 0);
        }
        for _ in 0..iters {
            fwd()?;
        }
        let submit = t0.elapsed().as_secs_f64();
        let gpu = match cx.stamps {
            Some(s) => {
                s.write(be, 1);
                Some(s.elapsed_ns(be)? * 1e-9)
            }
            None => None,
        };
        be.synchronize()?;
        let wall = t0.elapsed().as_secs_f64();
        rounds.push((wall, submit, gpu));
    }
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (wall, submit, gpu) = rounds[1];
    // per-stage GPU times: 3 more forwards with timestamps around each stage's compute pass
    let (mut stages, mut span_us, mut gaps_us) = (Vec::new(), 0.0, 0.0);
    // one timestamp pair per stage (compute pass)
    let per_fwd = counts.3;
    be.synchronize()?;
    if per_fwd > 0 && be.begin_stage_timestamps((3 * per_fwd) as u32) {
        for _ in 0..3 {
            fwd()?;
        }
        let st = be.end_stage_timestamps()?;
        if st.len() == 3 * per_fwd {
            let med = |mut v: Vec<f64>| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            for j in 0..per_fwd {
                stages.push((
                    st[j].label,
                    med((0..3).map(|r| st[r * per_fwd + j].gpu_ns).collect()) * 1e-3,
                ));
            }
            // the span of each forward and its idle time (span less its stages' sum)
            let spans: Vec<(f64, f64)> = (0..3)
                .map(|r| {
                    let f = &st[r * per_fwd..(r + 1) * per_fwd];
                    let span = f[per_fwd - 1].start_ns + f[per_fwd - 1].gpu_ns - f[0].start_ns;
                    (span, span - f.iter().map(|s| s.gpu_ns).sum::<f64>())
                })
                .collect();
            span_us = med(spans.iter().map(|s| s.0).collect()) * 1e-3;
            gaps_us = med(spans.iter().map(|s| s.1).collect()) * 1e-3;
        }
    }
    let per = |s: f64| s * 1e3 / iters as f64;
    Ok(Point {
        ms: per(wall),
        submit_ms: per(submit),
        gpu_ms: gpu.map(per),
        touched,
        bytes,
        floor_ms: floor_s * 1e3,
        counts,
        stages,
        span_us,
        gaps_us,
    })
}

/// The CUDA bench's CSV: (model, T) -> (graph ms, floor ms).
fn cuda_rows(path: &str) -> R<HashMap<(String, usize), (f64, f64)>> {
    let mut m = HashMap::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 7 {
            continue;
        }
        if let (Ok(t), Ok(ms), Ok(floor)) = (f[1].parse(), f[2].parse(), f[6].parse()) {
            m.insert((f[0].to_string(), t), (ms, floor));
        }
    }
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
fn run_model<T: Element>(
    cx: &Ctx<'_>,
    m: &Model,
    tokens: &[usize],
    filler: &mut Filler,
    cuda: &HashMap<(String, usize), (f64, f64)>,
    csv: &mut Option<std::fs::File>,
    deadline: Instant,
) -> R<()>
where
    WgpuBackend: MoeStages<T>,
{
    let be = cx.be;
    let limits = be.device().limits();
    let mut c = m.config;
    let note = fit(
        &mut c,
        size_of::<T>() as u64,
        limits.max_storage_buffer_binding_size,
        limits.max_buffer_size,
    );
    let name = match &note {
        Some(n) => format!("{} {n}", m.name),
        None => m.name.to_string(),
    };
    let dt = T::DTYPE.name();
    let tmax = tokens.iter().copied().max().unwrap_or(1);
    let plan = MoePlan::new(&c, tmax)?;
    let ws_bytes = plan.workspace_bytes(T::DTYPE)?;
    let t0 = Instant::now();
    let w = weights::<T>(be, &c, filler);
    let x = filler.tensor::<T>(be, tmax * c.hidden, 1.0);
    let out = Filler::buffer(be, (tmax * c.hidden * size_of::<T>()) as u64);
    let ws = Filler::buffer(be, ws_bytes as u64);
    be.synchronize()?;
    println!(
        "# {name} [{dt}]: H={} I={} E={} K={}{} (weights ready in {:.1} s)",
        c.hidden,
        c.local_intermediate(),
        c.experts,
        c.top_k,
        c.shared.map_or(String::new(), |s| format!(" + shared I={}", s.mlp.intermediate)),
        t0.elapsed().as_secs_f64()
    );
    let wv = views::<T>(&c, &w)?;
    for &t in tokens {
        if Instant::now() > deadline {
            println!("{name:<44} {dt:<4} T={t:<5} skipped: past the time budget (--budget-s)");
            continue;
        }
        let p = match bench_point::<T>(cx, &c, &plan, &wv, &x, &out, &ws, ws_bytes, t) {
            Ok(p) => p,
            Err(e) => {
                println!("{name:<44} {dt:<4} T={t:<5} error: {e}");
                continue;
            }
        };
        let pct = 100.0 * p.floor_ms / p.ms;
        let gbs = p.bytes / (p.ms * 1e-3) / 1e9;
        let gpu = p.gpu_ms.map_or("-".to_string(), |g| format!("{g:.3}"));
        let cu =
            if note.is_none() && !cx.quick { cuda.get(&(m.name.to_string(), t)) } else { None };
        let cu_s = cu.map_or(String::new(), |(ms, fl)| {
            format!(" | cuda {ms:.3} ms = {:.1}% of its floor", 100.0 * fl / ms)
        });
        let (nd, ng, ns, _) = p.counts;
        println!(
            "{name:<44} {dt:<4} T={t:<5} {:>9.3} ms (submit {:>7.3}, gpu {gpu:>8}) {gbs:>7.1} GB/s floor {:>7.3} ms = {pct:>5.1}% of floor | experts {} | {nd} dispatches ({ng} gemv), {ns} submits{cu_s}",
            p.ms, p.submit_ms, p.floor_ms, p.touched
        );
        if !p.stages.is_empty() {
            let list: Vec<String> = p.stages.iter().map(|(l, us)| format!("{l} {us:.1}")).collect();
            let sum: f64 = p.stages.iter().map(|s| s.1).sum();
            println!(
                "    stages (GPU us, median of 3 forwards): {} | sum {sum:.1}, span {:.1} (gaps {:.1})",
                list.join(" | "),
                p.span_us,
                p.gaps_us
            );
        }
        if let Some(f) = csv.as_mut() {
            writeln!(
                f,
                "{},{dt},{t},{:.4},{:.4},{},{:.1},{:.4},{:.2},{},{},{},{:.0},{:.0}",
                name.replace(',', ";"),
                p.ms,
                p.submit_ms,
                p.gpu_ms.map_or(String::new(), |g| format!("{g:.4}")),
                gbs,
                p.floor_ms,
                pct,
                p.touched,
                cu.map_or(String::new(), |c| format!("{:.4}", c.0)),
                cu.map_or(String::new(), |c| format!("{:.2}", 100.0 * c.1 / c.0)),
                cx.copy_bw / 1e9,
                cx.read_bw / 1e9,
            )?;
        }
    }
    Ok(())
}

fn main() -> R<()> {
    let quick = flag("--quick");
    let want = [wgpu::Features::TIMESTAMP_QUERY, wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS];
    // MOE_WGPU_EXPERT_GEMM=tiled|decode|decode-scalar|auto (default auto) picks the expert
    // GEMM variant.
    let expert_gemm = match std::env::var("MOE_WGPU_EXPERT_GEMM").as_deref() {
        Ok("tiled") => moe_wgpu::ExpertGemm::Tiled,
        Ok("decode") => moe_wgpu::ExpertGemm::Decode,
        Ok("decode-scalar") => moe_wgpu::ExpertGemm::DecodeScalar,
        _ => moe_wgpu::ExpertGemm::Auto,
    };
    // MOE_WGPU_GEMV_MAX_ROWS=N: the most rows (tokens of a linear, rows per expert on average)
    // for which the few-row GEMM is taken (default moe_wgpu::GEMV_MAX_ROWS).
    let gemv_max_rows = std::env::var("MOE_WGPU_GEMV_MAX_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(moe_wgpu::GEMV_MAX_ROWS);
    // MOE_WGPU_GEMV_KERNEL=stream|resident (default stream): the few-row GEMM's kernel
    // (moe_wgpu::FewRowGemm; resident is the earlier one, for A/B).
    let few_row = match std::env::var("MOE_WGPU_GEMV_KERNEL").as_deref() {
        Ok("resident") => moe_wgpu::FewRowGemm::Resident,
        _ => moe_wgpu::FewRowGemm::Stream,
    };
    println!(
        "wgpu_bench: expert GEMM variant {expert_gemm:?}, few-row GEMM up to {gemv_max_rows} rows, kernel {few_row:?}"
    );
    // MOE_WGPU_BATCH_FORWARD=0: submit each stage of a forward on its own (the earlier
    // behaviour, for A/B) instead of one submission per forward.
    let batch_forward = std::env::var("MOE_WGPU_BATCH_FORWARD").map_or(true, |v| v != "0");
    println!("wgpu_bench: one submission per forward: {batch_forward}");
    // MOE_WGPU_GEMV_STREAM_WORDS=N: about N 16-byte words of each weight row per lane of the
    // stream kernel (its lanes per output feature; default moe_shaders::GEMV_STREAM_WORDS).
    let gemv_stream_words = std::env::var("MOE_WGPU_GEMV_STREAM_WORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(Options::default().gemv_stream_words);
    println!("wgpu_bench: stream kernel words per lane: about {gemv_stream_words}");
    let options = Options {
        expert_gemm,
        gemv_max_rows,
        few_row,
        batch_forward,
        gemv_stream_words,
        ..Options::default()
    };
    let be = match WgpuBackend::request_with_features(options, want[0] | want[1]) {
        Ok(Some(b)) => b,
        Ok(None) => {
            println!("wgpu_bench: skipped: no wgpu adapter");
            return Ok(());
        }
        Err(e) => {
            println!("wgpu_bench: skipped: no usable wgpu device: {e}");
            return Ok(());
        }
    };
    let info = be.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}), driver: {} {}, vendor 0x{:04x} device 0x{:04x}",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        info.vendor,
        info.device
    );
    let limits = be.device().limits();
    println!("device features: {:?}", be.device().features());
    println!(
        "limits: max_buffer_size {} B, max_storage_buffer_binding_size {} B, max_compute_workgroups_per_dimension {}, native f16: {}",
        limits.max_buffer_size,
        limits.max_storage_buffer_binding_size,
        limits.max_compute_workgroups_per_dimension,
        be.native_f16()
    );
    if flag("--info") {
        return Ok(());
    }
    let stamps = Stamps::new(&be);
    println!("GPU timestamps: {}", if stamps.is_some() { "yes" } else { "no (wall clock only)" });
    let copy_bytes = if quick { 64 << 20 } else { 1u64 << 30 }.min(limits.max_buffer_size / 4 * 4);
    let (copy_bw, copy_gpu) = copy_bandwidth(&be, copy_bytes, stamps.as_ref())?;
    println!(
        "copy bandwidth (buffer to buffer, {} MiB, read + write): {:.0} GB/s{}",
        copy_bytes >> 20,
        copy_bw / 1e9,
        copy_gpu.map_or(String::new(), |g| format!(" (GPU timestamps: {:.0} GB/s)", g / 1e9))
    );
    let read_len = if quick { 64 << 20 } else { 1u64 << 30 }.min(limits.max_buffer_size / 16 * 16);
    let (read_bw, read_gpu) = shader_read_bandwidth(&be, read_len, stamps.as_ref())?;
    println!(
        "shader read bandwidth (compute shader, one 16-byte word per invocation, {} MiB): {:.0} GB/s{}",
        read_len >> 20,
        read_bw / 1e9,
        read_gpu.map_or(String::new(), |g| format!(" (GPU timestamps: {:.0} GB/s)", g / 1e9))
    );
    // The bandwidth floor uses the faster of the two wall-clock rates: on the H100 through
    // NVIDIA's Vulkan driver copy_buffer_to_buffer runs at 0.84 TB/s while a shader reads at
    // 2.9 TB/s, so a copy-based floor would be 3.4x too lenient (the CUDA bench's copy runs
    // at 3.0 TB/s on the same GPU).
    let bw = copy_bw.max(read_bw);
    println!(
        "bandwidth floor: {:.0} GB/s (max of the copy and shader read rates, wall clock)",
        bw / 1e9
    );
    let name = info.name.to_ascii_uppercase();
    let peak = match arg("--peak-tflops").and_then(|p| p.parse::<f64>().ok()) {
        Some(p) => p * 1e12,
        None if name.contains("H100") || name.contains("H200") => 989e12,
        None => 0.0,
    };
    if peak > 0.0 {
        println!(
            "flop floor: {:.0} TFLOP/s (dense bf16; the CUDA bench uses its measured cuBLAS rate)",
            peak / 1e12
        );
    } else {
        println!("flop floor: none (pass --peak-tflops); the floor is the bandwidth floor");
    }
    let tokens: Vec<usize> = arg("--tokens")
        .map(|t| t.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| if quick { vec![1, 16] } else { vec![1, 16, 128, 1024] });
    let models_want: Option<Vec<String>> =
        arg("--models").map(|m| m.split(',').map(String::from).collect());
    let dtypes = arg("--dtypes").unwrap_or_else(|| "bf16,f16".to_string());
    let cuda = match arg("--cuda-csv") {
        Some(p) => cuda_rows(&p).unwrap_or_else(|e| {
            println!("--cuda-csv {p}: {e} (no CUDA figures)");
            HashMap::new()
        }),
        None => HashMap::new(),
    };
    let mut csv = arg("--csv").map(std::fs::File::create).transpose()?;
    if let Some(f) = csv.as_mut() {
        writeln!(
            f,
            "shape,dtype,tokens,ms,submit_ms,gpu_ms,gbs,floor_ms,pct_floor,experts_touched,cuda_ms,cuda_pct_floor,copy_gbs,read_gbs"
        )?;
    }
    let budget = arg("--budget-s").and_then(|s| s.parse().ok()).unwrap_or(200.0);
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(budget);
    let cx = Ctx { be: &be, stamps: stamps.as_ref(), bw, copy_bw, read_bw, peak, quick };
    let mut filler = Filler {
        chunk_len: if quick { (1 << 16) + 6 } else { (1 << 23) + 6 },
        chunks: HashMap::new(),
        rng: Rng::new(0x9E37_79B9_7F4A_7C15),
    };
    let (div, emax) = if quick { (16, 16) } else { (1, usize::MAX) };
    for m in models(div, emax) {
        if models_want.as_ref().is_some_and(|w| !w.iter().any(|n| m.name.starts_with(n.as_str()))) {
            continue;
        }
        for dt in dtypes.split(',') {
            let r = match dt {
                "bf16" => {
                    run_model::<bf16>(&cx, &m, &tokens, &mut filler, &cuda, &mut csv, deadline)
                }
                "f16" if be.native_f16() => {
                    run_model::<f16>(&cx, &m, &tokens, &mut filler, &cuda, &mut csv, deadline)
                }
                "f16" => {
                    println!("# {} [f16]: skipped: the adapter has no SHADER_F16", m.name);
                    Ok(())
                }
                "f32" => run_model::<f32>(&cx, &m, &tokens, &mut filler, &cuda, &mut csv, deadline),
                other => {
                    println!("unknown dtype {other} (bf16, f16, f32)");
                    Ok(())
                }
            };
            if let Err(e) = r {
                println!("# {} [{dt}]: error: {e}", m.name);
            }
            be.synchronize()?;
        }
    }
    Ok(())
}
