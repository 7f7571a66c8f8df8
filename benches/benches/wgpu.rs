//! Criterion benches of the wgpu backend: one whole forward (all stages, then a device wait)
//! per iteration on the canonical shapes (Qwen3-30B-A3B, gpt-oss-120b, Mixtral-8x7B,
//! DeepSeek-V3 with its shared expert) at T in {1, 16, 128, 1024}, in bf16 and f16 (f16 where
//! the adapter has `SHADER_F16`).
//!
//! The expert count is halved only where a limit forces it, and the bench name says which:
//! `binding` (a tensor larger than the device's `max_storage_buffer_binding_size`, 2 GiB - 1
//! under wgpu on Vulkan: DeepSeek-V3's 256 experts) or `memory` (all weights above
//! `MOE_BENCH_MAX_GB`, default 48 on a GPU and 4 on a CPU adapter).
//!
//! `cargo bench -p moe-benches --features wgpu`. On a software adapter (lavapipe) the full set
//! takes hours: `MOE_BENCH_QUICK=1` runs the same shapes with H and I divided by 16 and at most
//! 16 experts, at T in {1, 16}. Narrow a run with `MOE_BENCH_SHAPES=qwen,mixtral`,
//! `MOE_BENCH_T=1,16`, `MOE_BENCH_DTYPES=bf16,f16,f32`. For the HBM-floor report use the
//! `wgpu_bench` example of moe-wgpu. Prints a line and measures nothing where no adapter exists.

use criterion::{Criterion, criterion_group, criterion_main};
use moe_core::conformance::Rng;
use moe_core::*;
use moe_wgpu::{WgpuBackend, WgpuView, WgpuViewMut};
use std::hint::black_box;

fn mlp(i: usize, act: Activation, bias: bool) -> MlpConfig {
    MlpConfig { intermediate: i, gated: true, activation: act, bias }
}

/// The canonical shapes (as in the CUDA bench); `div` divides H and I, `emax` caps E.
fn shapes(div: usize, emax: usize) -> Vec<(&'static str, MoeConfig)> {
    let base = |h: usize, e: usize, k: usize, i: usize| {
        let e = e.min(emax);
        MoeConfig {
            hidden: h / div,
            experts: e,
            top_k: k.min(e),
            router: RouterConfig { reduce: TopkReduce::Sum { eps: 0.0 }, ..Default::default() },
            expert: ExpertConfig {
                mlp: mlp(i / div, Activation::Silu, false),
                apply_weight_on_input: false,
            },
            shared: None,
            latent: None,
            parallel: ParallelConfig::default(),
        }
    };
    let mut gpt = base(2880, 128, 4, 2880);
    gpt.router = RouterConfig {
        scoring: Scoring::None,
        bias: true,
        weights: WeightSource::SoftmaxTopkLogits,
        reduce: TopkReduce::None,
        ..RouterConfig::default()
    };
    gpt.expert.mlp = mlp(2880 / div, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, true);
    let mut ds = base(7168, 256, 8, 2048);
    ds.router = RouterConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        groups: Some(GroupLimit { n_group: 8, topk_group: 4, score: GroupScore::Top2Sum }),
        reduce: TopkReduce::NOAUX_TC,
        scale: RoutedScale { factor: 2.5, placement: ScalePlacement::OnOutput },
        ..RouterConfig::default()
    };
    ds.shared = Some(SharedConfig {
        mlp: mlp(2048 / div, Activation::Silu, false),
        gate: SharedGate::None,
    });
    vec![
        ("qwen3_30b_a3b", base(2048, 128, 8, 768)),
        ("gpt_oss_120b", gpt),
        ("mixtral_8x7b", base(4096, 8, 2, 14336)),
        ("deepseek_v3", ds),
    ]
}

/// Halve E while a tensor exceeds the binding limit or all weights exceed `max_bytes`
/// (keeping E >= K and E a multiple of the group count). Returns the name suffix.
fn fit(c: &mut MoeConfig, elem: u64, max_binding: u64, max_bytes: u64) -> String {
    let tensor = |c: &MoeConfig| (c.experts * c.hidden * c.expert.mlp.intermediate) as u64 * elem;
    let groups = c.router.groups.map_or(1, |g| g.n_group);
    let e0 = c.experts;
    let mut why = "";
    loop {
        let over = if tensor(c) > max_binding {
            "binding"
        } else if 3 * tensor(c) > max_bytes {
            "memory"
        } else {
            break;
        };
        if c.experts / 2 < c.top_k || !(c.experts / 2).is_multiple_of(groups) {
            break;
        }
        if why.is_empty() {
            why = over;
        }
        c.experts /= 2;
    }
    if c.experts == e0 { String::new() } else { format!("_e{}of{e0}_{why}", c.experts) }
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn empty(be: &WgpuBackend, bytes: u64) -> wgpu::Buffer {
    be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench"),
        size: bytes.div_ceil(4).max(1) * 4,
        usage: USAGE,
        mapped_at_creation: false,
    })
}

fn upload<T: Element>(be: &WgpuBackend, v: &[f64]) -> wgpu::Buffer {
    let e: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    let mut bytes: Vec<u8> = bytemuck::cast_slice(&e).to_vec();
    bytes.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
    let b = empty(be, bytes.len() as u64);
    be.queue().write_buffer(&b, 0, &bytes);
    b
}

/// `n` elements: a random chunk of normals scaled by `scale`, tiled by buffer copies.
fn tiled<T: Element>(be: &WgpuBackend, r: &mut Rng, n: usize, scale: f64) -> wgpu::Buffer {
    let chunk = upload::<T>(be, &r.tensor(n.min((1 << 20) + 6), scale));
    let total = ((n * size_of::<T>()) as u64).div_ceil(4).max(1) * 4;
    let b = empty(be, total);
    let mut enc = be.device().create_command_encoder(&Default::default());
    let mut at = 0;
    while at < total {
        let len = (total - at).min(chunk.size());
        enc.copy_buffer_to_buffer(&chunk, 0, &b, at, len);
        at += len;
    }
    be.queue().submit([enc.finish()]);
    b
}

fn v<U: bytemuck::Pod>(b: &wgpu::Buffer, len: usize) -> WgpuView<'_, U> {
    WgpuView::new(b, 0, len).expect("view")
}

fn bench_shape<T: Element>(
    c: &mut Criterion,
    be: &WgpuBackend,
    name: &str,
    cfg: &MoeConfig,
    tokens: &[usize],
) where
    WgpuBackend: MoeStages<T>,
{
    let (h, e, i) = (cfg.hidden, cfg.experts, cfg.expert.mlp.intermediate);
    let mut r = Rng::new(1);
    let (sh, si) = (1.0 / (h as f64).sqrt(), 1.0 / (i as f64).sqrt());
    let router = upload::<T>(be, &r.tensor(e * h, sh));
    let router_bias = cfg.router.bias.then(|| upload::<T>(be, &r.tensor(e, 0.1)));
    let sel = cfg.router.selection_bias.then(|| upload::<f32>(be, &r.tensor(e, 0.01)));
    let gate = tiled::<T>(be, &mut r, e * i * h, sh);
    let up = tiled::<T>(be, &mut r, e * i * h, sh);
    let down = tiled::<T>(be, &mut r, e * h * i, si);
    let bias = cfg.expert.mlp.bias.then(|| {
        [
            upload::<T>(be, &r.tensor(e * i, 0.1)),
            upload::<T>(be, &r.tensor(e * i, 0.1)),
            upload::<T>(be, &r.tensor(e * h, 0.1)),
        ]
    });
    let is = cfg.shared.map_or(0, |s| s.mlp.intermediate);
    let shared = cfg.shared.map(|_| {
        [
            tiled::<T>(be, &mut r, is * h, sh),
            tiled::<T>(be, &mut r, is * h, sh),
            tiled::<T>(be, &mut r, h * is, 1.0 / (is as f64).sqrt()),
        ]
    });
    let tmax = tokens.iter().copied().max().unwrap_or(1);
    let xb = tiled::<T>(be, &mut r, tmax * h, 1.0);
    let plan = MoePlan::new(cfg, tmax).expect("plan");
    let ws_bytes = plan.workspace_bytes(T::DTYPE).expect("workspace");
    let ws = empty(be, ws_bytes as u64);
    let out = empty(be, (tmax * h * size_of::<T>()) as u64);
    let weights = MoeWeights::<WgpuBackend, T> {
        router: v(&router, e * h),
        router_bias: router_bias.as_ref().map(|b| v(b, e)),
        selection_bias: sel.as_ref().map(|b| v(b, e)),
        experts: MlpWeights {
            gate: Some(v(&gate, e * i * h)),
            up: v(&up, e * i * h),
            down: v(&down, e * h * i),
            gate_bias: bias.as_ref().map(|b| v(&b[0], e * i)),
            up_bias: bias.as_ref().map(|b| v(&b[1], e * i)),
            down_bias: bias.as_ref().map(|b| v(&b[2], e * h)),
        },
        shared: shared.as_ref().map(|[g, u, d]| SharedWeights {
            mlp: MlpWeights {
                gate: Some(v(g, is * h)),
                up: v(u, is * h),
                down: v(d, h * is),
                gate_bias: None,
                up_bias: None,
                down_bias: None,
            },
            gate: None,
        }),
        latent: None,
        expert_map: None,
    };
    be.synchronize().expect("upload");
    for &t in tokens {
        let id = format!("wgpu/{name}/T={t}/{}", T::DTYPE.name());
        let fwd = || {
            forward(
                be,
                &plan,
                &weights,
                t,
                v(&xb, t * h),
                WgpuViewMut::new(&out, 0, t * h).expect("out"),
                WgpuViewMut::<u8>::new(&ws, 0, ws_bytes).expect("ws"),
                &SingleRank,
            )
        };
        if let Err(err) = fwd() {
            println!("{id}: skipped: {err}");
            continue;
        }
        c.bench_function(&id, |b| {
            b.iter(|| {
                fwd().expect("forward");
                be.synchronize().expect("sync");
                black_box(&out);
            })
        });
    }
}

fn benches(c: &mut Criterion) {
    let be = match WgpuBackend::request() {
        Ok(Some(b)) => b,
        _ => {
            println!("moe-benches: no wgpu adapter, nothing to measure");
            return;
        }
    };
    let info = be.adapter_info();
    println!(
        "moe-benches: wgpu adapter {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    let quick = std::env::var("MOE_BENCH_QUICK").is_ok_and(|v| v != "0");
    let cpu = info.device_type == wgpu::DeviceType::Cpu;
    let max_gb: f64 = std::env::var("MOE_BENCH_MAX_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cpu { 4.0 } else { 48.0 });
    let tokens: Vec<usize> = moe_benches::env_list("MOE_BENCH_T", ',')
        .map(|v| v.iter().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or(if quick { vec![1, 16] } else { vec![1, 16, 128, 1024] });
    let want = moe_benches::env_list("MOE_BENCH_SHAPES", ',');
    let dtypes =
        moe_benches::env_list("MOE_BENCH_DTYPES", ',').unwrap_or(vec!["bf16".into(), "f16".into()]);
    let (div, emax) = if quick { (16, 16) } else { (1, usize::MAX) };
    let limits = be.device().limits();
    for (name, cfg) in shapes(div, emax) {
        if want.as_ref().is_some_and(|w| !w.iter().any(|n| name.starts_with(n.as_str()))) {
            continue;
        }
        for dt in &dtypes {
            let elem = if dt == "f32" { 4 } else { 2 };
            let mut cfg = cfg;
            let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
            let suffix = fit(&mut cfg, elem, max_binding, (max_gb * 1e9) as u64);
            let full = format!("{name}{}{suffix}", if quick { "_quick" } else { "" });
            match dt.as_str() {
                "bf16" => bench_shape::<half::bf16>(c, &be, &full, &cfg, &tokens),
                "f16" if be.native_f16() => bench_shape::<half::f16>(c, &be, &full, &cfg, &tokens),
                "f16" => println!("wgpu/{full}/f16: skipped: the adapter has no SHADER_F16"),
                "f32" => bench_shape::<f32>(c, &be, &full, &cfg, &tokens),
                other => println!("MOE_BENCH_DTYPES: unknown {other} (bf16, f16, f32)"),
            }
        }
    }
}

criterion_group! {
    name = wgpu_benches;
    config = Criterion::default().sample_size(10);
    targets = benches
}
criterion_main!(wgpu_benches);
