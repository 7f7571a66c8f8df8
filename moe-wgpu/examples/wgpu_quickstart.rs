//! wgpu quickstart: load a golden MoE block (DeepSeek-V3 by default; pass another case name or
//! set `MOE_GOLDEN_DIR`), route and compute it on the first wgpu adapter (lavapipe works) in
//! f32, f16 and bf16, and print the routing and the error against the golden output. Exits
//! with a message where no adapter exists.
//!
//! `cargo run --release -p moe-wgpu --example wgpu_quickstart [CASE]`

use moe_core::conformance::{Case, ElementWeights, golden_dir, load_case, rel_err};
use moe_core::*;
use moe_wgpu::{WgpuBackend, WgpuView, WgpuViewMut};
use std::time::Instant;

/// A storage buffer holding `data` (or `bytes` of 0xFF poison), and its element count.
fn buffer<U: bytemuck::Pod>(be: &WgpuBackend, data: &[U]) -> (wgpu::Buffer, usize) {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
    let b = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("quickstart"),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut v = bytes.to_vec();
    v.resize(size as usize, 0xFF);
    be.queue().write_buffer(&b, 0, &v);
    (b, data.len())
}

fn read(be: &WgpuBackend, b: &wgpu::Buffer, offset: u64, bytes: usize) -> Vec<u8> {
    let size = (bytes as u64).div_ceil(4) * 4;
    let staging = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = be.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(b, offset, &staging, 0, size);
    be.queue().submit([enc.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    let _ = be.synchronize();
    let v = staging.slice(..).get_mapped_range().map(|r| r.to_vec()).unwrap_or_default();
    v[..bytes.min(v.len())].to_vec()
}

fn view<U: bytemuck::Pod>(b: &(wgpu::Buffer, usize)) -> WgpuView<'_, U> {
    WgpuView::new(&b.0, 0, b.1).expect("a view of a whole buffer fits")
}

fn o<T: bytemuck::Pod>(b: &Option<(wgpu::Buffer, usize)>) -> Option<WgpuView<'_, T>> {
    b.as_ref().map(view::<T>)
}

fn run<T: Element>(be: &WgpuBackend, case: &Case) -> Result<(Vec<i32>, Vec<f64>, f64)>
where
    WgpuBackend: MoeStages<T>,
{
    let c = &case.config;
    let (t, h, k) = (case.tokens, c.hidden, c.top_k);
    let plan = MoePlan::new(c, t)?;
    let ew = ElementWeights::<T>::from_host(&case.weights);
    let up = |v: &Vec<T>| buffer(be, v);
    let opt = |v: &Option<Vec<T>>| v.as_ref().map(|v| buffer(be, v));
    let (router, router_bias) = (up(&ew.router), opt(&ew.router_bias));
    let sel = ew.selection_bias.as_ref().map(|b| buffer(be, b));
    let m = &ew.experts;
    let (gate, upw, down) = (opt(&m.gate), up(&m.up), up(&m.down));
    let (gb, ub, db) = (opt(&m.gate_bias), opt(&m.up_bias), opt(&m.down_bias));
    let shared = ew.shared.as_ref().map(|(s, g)| {
        (
            opt(&s.gate),
            up(&s.up),
            up(&s.down),
            opt(&s.gate_bias),
            opt(&s.up_bias),
            opt(&s.down_bias),
            opt(g),
        )
    });
    let latent =
        ew.latent.as_ref().map(|l| (up(&l.fc1), up(&l.fc2), opt(&l.fc1_bias), opt(&l.fc2_bias)));
    let emap = ew.expert_map.as_ref().map(|m| buffer(be, m));
    let x = buffer(be, &case.x.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>());
    let out = buffer(be, &vec![T::from_f32(f32::NAN); t * h]);
    let ws_bytes = plan.workspace_bytes(T::DTYPE)?;
    let ws = buffer(be, &vec![0xFFu8; ws_bytes]);
    let weights = MoeWeights::<WgpuBackend, T> {
        router: view(&router),
        router_bias: o(&router_bias),
        selection_bias: sel.as_ref().map(view::<f32>),
        experts: MlpWeights {
            gate: o(&gate),
            up: view(&upw),
            down: view(&down),
            gate_bias: o(&gb),
            up_bias: o(&ub),
            down_bias: o(&db),
        },
        shared: shared.as_ref().map(|(g, u, d, gb, ub, db, gw)| SharedWeights {
            mlp: MlpWeights {
                gate: o(g),
                up: view(u),
                down: view(d),
                gate_bias: o(gb),
                up_bias: o(ub),
                down_bias: o(db),
            },
            gate: o(gw),
        }),
        latent: latent.as_ref().map(|(f1, f2, b1, b2)| LatentWeights {
            fc1: view(f1),
            fc2: view(f2),
            fc1_bias: o(b1),
            fc2_bias: o(b2),
        }),
        expert_map: emap.as_ref().map(view::<i32>),
    };
    let start = Instant::now();
    forward(
        be,
        &plan,
        &weights,
        t,
        view(&x),
        WgpuViewMut::new(&out.0, 0, t * h)?,
        WgpuViewMut::new(&ws.0, 0, ws_bytes)?,
        &SingleRank,
    )?;
    be.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let layout = plan.layout(T::DTYPE)?;
    let ids: Vec<i32> =
        bytemuck::pod_collect_to_vec(&read(be, &ws.0, layout.topk_ids.offset as u64, 4 * t * k));
    let o: Vec<T> = bytemuck::pod_collect_to_vec(&read(be, &out.0, 0, t * h * size_of::<T>()));
    Ok((ids, o.iter().map(|v| v.to_f64()).collect(), secs))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let Some(be) = WgpuBackend::request()? else {
        println!("moe-wgpu quickstart: no wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
        return Ok(());
    };
    let name = std::env::args().nth(1).unwrap_or_else(|| "deepseek_v3".into());
    let path = golden_dir().join(format!("{name}.json"));
    let case = load_case(&path)?;
    let c = &case.config;
    let i = be.adapter_info();
    let adapter = format!("{} ({:?})", i.name, i.backend);
    println!("moe-kernels wgpu quickstart: {} on {adapter}", case.name);
    println!(
        "  tokens {}  hidden {}  experts {}  top_k {}  scoring {:?}  groups {:?}",
        case.tokens, c.hidden, c.experts, c.top_k, c.router.scoring, c.router.groups
    );
    let (ids, out, secs) = run::<f32>(&be, &case)?;
    let k = c.top_k;
    for t in 0..case.tokens.min(4) {
        println!("  token {t}: experts {:?}", &ids[t * k..(t + 1) * k]);
    }
    println!("\n  dtype  rel. error vs golden output   forward time (first run: shader compile)");
    println!(
        "  f32    {:.3e}                      {:.1} ms",
        rel_err(&out, &case.expected.out),
        secs * 1e3
    );
    let (_, out, secs) = run::<half::f16>(&be, &case)?;
    println!(
        "  f16    {:.3e}                      {:.1} ms",
        rel_err(&out, &case.expected.out),
        secs * 1e3
    );
    let (_, out, secs) = run::<half::bf16>(&be, &case)?;
    println!(
        "  bf16   {:.3e}                      {:.1} ms",
        rel_err(&out, &case.expected.out),
        secs * 1e3
    );
    println!("\nbuffers created by the backend: {} (all at construction)", be.buffers_created());
    Ok(())
}
