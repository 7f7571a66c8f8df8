//! Criterion benches of the wgpu backend: one whole forward (all stages, then a device wait)
//! per iteration, on a few shapes, in f32 and f16. `cargo bench -p moe-benches --features wgpu`.
//! Prints a line and measures nothing where no adapter exists.

use criterion::{Criterion, criterion_group, criterion_main};
use moe_core::conformance::{Rng, random_weights};
use moe_core::*;
use moe_wgpu::{WgpuBackend, WgpuView, WgpuViewMut};
use std::hint::black_box;

fn shape(hidden: usize, experts: usize, top_k: usize, inter: usize) -> MoeConfig {
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

fn buffer(be: &WgpuBackend, bytes: &[u8]) -> wgpu::Buffer {
    let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
    let b = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench"),
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut v = bytes.to_vec();
    v.resize(size as usize, 0xFF);
    be.queue().write_buffer(&b, 0, &v);
    b
}

fn upload<T: Element>(be: &WgpuBackend, v: &[f64]) -> (wgpu::Buffer, usize) {
    let e: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    (buffer(be, bytemuck::cast_slice(&e)), e.len())
}

fn v<T: Element>(b: &(wgpu::Buffer, usize)) -> WgpuView<'_, T> {
    WgpuView::new(&b.0, 0, b.1).expect("view")
}

fn bench_one<T: Element>(
    c: &mut Criterion,
    be: &WgpuBackend,
    name: &str,
    cfg: &MoeConfig,
    tokens: usize,
) {
    let mut r = Rng::new(1);
    let w = random_weights(cfg, &mut r);
    let x = r.tensor(tokens * cfg.hidden, 1.0);
    let plan = MoePlan::new(cfg, tokens).expect("plan");
    let router = upload::<T>(be, &w.router);
    let gate = upload::<T>(be, w.experts.gate.as_deref().expect("gated"));
    let up = upload::<T>(be, &w.experts.up);
    let down = upload::<T>(be, &w.experts.down);
    let xb = upload::<T>(be, &x);
    let ws_bytes = plan.workspace_bytes(T::DTYPE).expect("workspace");
    let ws = buffer(be, &vec![0xFF; ws_bytes]);
    let out = buffer(be, &vec![0xFF; tokens * cfg.hidden * size_of::<T>()]);
    let weights = MoeWeights::<WgpuBackend, T> {
        router: v(&router),
        router_bias: None,
        selection_bias: None,
        experts: MlpWeights {
            gate: Some(v(&gate)),
            up: v(&up),
            down: v(&down),
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        },
        shared: None,
        latent: None,
        expert_map: None,
    };
    let id = format!("wgpu/{name}/T={tokens}/{}", T::DTYPE.name());
    c.bench_function(&id, |b| {
        b.iter(|| {
            forward(
                be,
                &plan,
                &weights,
                tokens,
                v(&xb),
                WgpuViewMut::new(&out, 0, tokens * cfg.hidden).expect("out"),
                WgpuViewMut::<u8>::new(&ws, 0, ws_bytes).expect("ws"),
                &SingleRank,
            )
            .expect("forward");
            be.synchronize().expect("sync");
            black_box(&out);
        })
    });
}

fn benches(c: &mut Criterion) {
    let be = match WgpuBackend::request() {
        Ok(Some(b)) => b,
        _ => {
            println!("moe-benches: no wgpu adapter, nothing to measure");
            return;
        }
    };
    let shapes = [
        ("mixtral-small H=1024 E=8 K=2 I=2048", shape(1024, 8, 2, 2048)),
        ("fine-grained H=1024 E=64 K=8 I=256", shape(1024, 64, 8, 256)),
    ];
    for (name, cfg) in &shapes {
        for tokens in [1, 64, 256] {
            bench_one::<f32>(c, &be, name, cfg, tokens);
            bench_one::<half::f16>(c, &be, name, cfg, tokens);
        }
    }
}

criterion_group! {
    name = wgpu_benches;
    config = Criterion::default().sample_size(10);
    targets = benches
}
criterion_main!(wgpu_benches);
